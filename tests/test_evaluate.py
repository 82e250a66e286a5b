"""Evaluation: metrics on known inputs, `dmerge eval`, the gate of `dmerge run`, `dmerge search`."""

from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
import yaml
from click.testing import CliRunner

from dmerge.cli import main
from dmerge.errors import DMergeError
from dmerge.evaluate import (EvalOptions, Score, bootstrap_perplexity_interval, cut_at_stop, exact_match,
                             greedy_continuations, load_data, lm_eval_scores, perplexity, score_exact_match,
                             score_perplexity, token_nll, wilson_interval)
from dmerge.toymodels import LlamaShape, write_char_tokenizer, write_family

CHARS = list("abcdefgh01234567 =\nRS")


# ---------------------------------------------------------------------------------------
# Metrics on known inputs


class _FixedLogits(torch.nn.Module):
    """A "model" whose next-token logits depend only on the last token: row ``table[t]``."""

    def __init__(self, table: torch.Tensor, context: int = 64):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = types.SimpleNamespace(max_position_embeddings=context)
        self.forward_calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        self.forward_calls.append(tuple(input_ids.shape))
        return types.SimpleNamespace(logits=self.table[input_ids], past_key_values=())


class _IdTokenizer:
    """Text "a b c" <-> ids of single characters, eos id 0."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) - 96 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 96) for i in ids if i != 0)


def test_uniform_logits_have_perplexity_of_the_vocabulary():
    V = 7
    model = _FixedLogits(torch.zeros(V, V))
    r = score_perplexity(model, _IdTokenizer(), ["abcdef", "abc", "bb"], EvalOptions(batch_size=2, quiet=True))
    assert r["value"] == pytest.approx(V, rel=1e-6)
    assert r["extra"]["tokens"] == 5 + 2 + 1  # each document predicts all but its first token
    assert r["ci_low"] == pytest.approx(V, rel=1e-6) and r["ci_high"] == pytest.approx(V, rel=1e-6)


def test_perplexity_of_known_logits_matches_the_hand_computation():
    V = 5
    table = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]] * V))  # every next token: these probabilities
    model = _FixedLogits(table)
    docs = ["abcd", "dd"]  # ids 1 2 3 4 / 4 4: predicted 2,3,4 and 4
    r = score_perplexity(model, _IdTokenizer(), docs, EvalOptions(batch_size=4, quiet=True))
    nll = -(math.log(0.3) + math.log(0.15) + math.log(0.25) + math.log(0.25))
    assert r["value"] == pytest.approx(math.exp(nll / 4), rel=1e-6)
    # padding predicts nothing: the same score one document per batch
    r1 = score_perplexity(model, _IdTokenizer(), docs, EvalOptions(batch_size=1, quiet=True))
    assert r1["value"] == pytest.approx(r["value"], rel=1e-12)


def test_token_nll_ignores_padding():
    logits = torch.zeros(2, 4, 3)
    ids = torch.tensor([[1, 2, 0, 0], [1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    nll, count = token_nll(logits, ids, mask)
    assert count.tolist() == [1, 3]
    assert nll.tolist() == pytest.approx([math.log(3), 3 * math.log(3)])
    assert perplexity(float(nll.sum()), int(count.sum())) == pytest.approx(3)


def test_bootstrap_interval_brackets_the_corpus_perplexity_and_is_reproducible():
    nll = [2.0, 3.0, 1.0, 4.0, 2.5, 3.5]
    tok = [2, 2, 1, 3, 2, 2]
    lo, hi = bootstrap_perplexity_interval(nll, tok, seed=1)
    assert lo < perplexity(sum(nll), sum(tok)) < hi
    assert (lo, hi) == bootstrap_perplexity_interval(nll, tok, seed=1)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)  # the textbook example: 8 of 10, 95 %
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)


def test_exact_match_rule():
    assert exact_match(" cba\nmore", "cba")
    assert not exact_match("cbaa\n", "cba")
    assert cut_at_stop("12;34", ";") == "12" and cut_at_stop("1234", None) == "1234"


def test_greedy_decoding_stops_at_the_stop_string_and_at_eos():
    V = 27
    nxt = torch.full((V, V), -10.0)
    for t in range(1, V):  # after letter t comes letter t+1; after "e" (5) the stop "x" (24); after "z" eos
        nxt[t, t + 1 if t + 1 < V else 0] = 10.0
    nxt[5, :] = -10.0
    nxt[5, 24] = 10.0
    nxt[24, :] = -10.0
    nxt[24, 0] = 10.0
    model = _FixedLogits(nxt)
    tok = _IdTokenizer()
    opts = EvalOptions(batch_size=2, max_new_tokens=6, stop="x", quiet=True)
    out = greedy_continuations(model, tok, ["ab", "c", "st"], opts)
    assert out == ["cdex", "dex", "uvwx"]  # each cut after its stop string
    assert greedy_continuations(model, tok, ["w"], EvalOptions(max_new_tokens=6, stop=None, quiet=True)) == ["x"]  # eos
    r = score_exact_match(model, tok, [{"prompt": "ab", "answer": "cde"}, {"prompt": "c", "answer": "d"}],
                          EvalOptions(batch_size=2, max_new_tokens=6, stop="x", quiet=True))
    assert r["value"] == 0.5 and r["extra"]["correct"] == 1
    assert (r["ci_low"], r["ci_high"]) == wilson_interval(1, 2)


def test_load_data_formats_and_errors(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "R ab=", "answer": "ba"}\n\n{"prompt": "R c=", "answer": "c"}\n')
    txt = tmp_path / "wiki.txt"
    txt.write_text("one line\n\nanother\n")
    lm = tmp_path / "lm.jsonl"
    lm.write_text('{"text": "hello"}\n')
    assert load_data(str(qa)).metric == "exact_match" and len(load_data(str(qa)).records) == 2
    assert load_data(str(txt)).records == ["one line", "another"]
    assert load_data(str(lm)).metric == "perplexity"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DMergeError, match="needs 'prompt' and 'answer'"):
        load_data(str(bad))
    with pytest.raises(DMergeError, match="cannot read data file"):
        load_data(str(tmp_path / "missing.jsonl"))


def test_lm_eval_results_become_scores_with_normal_intervals():
    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.05,
                                        "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.04}},
               "n-samples": {"arc_easy": {"original": 100, "effective": 100}}}
    scores = {s.metric: s for s in lm_eval_scores(results, "m")}
    assert set(scores) == {"lm_eval:acc", "lm_eval:acc_norm"}
    assert scores["lm_eval:acc"].ci_low == pytest.approx(0.5 - 1.959964 * 0.05, rel=1e-5)
    assert scores["lm_eval:acc"].n == 100


# ---------------------------------------------------------------------------------------
# Real tiny models: dmerge eval, the gate, the search


@pytest.fixture(scope="module")
def char_family(tmp_path_factory):
    """base + ft1 + ft2 (float32, char tokenizer) and prompt/answer + text data."""
    root = tmp_path_factory.mktemp("charfam")
    shape = LlamaShape(hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, vocab=3 + len(CHARS))
    folders = write_family(str(root), shape, n_fine_tunes=2, dtype="float32")
    for f in folders:
        write_char_tokenizer(f, CHARS)
    qa = root / "rev.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"R {s}=", "answer": s[::-1]}) + "\n"
                          for s in ["abc", "hgd", "ab", "ffe", "cab", "dd"]))
    txt = root / "text.txt"
    txt.write_text("R abc=cba\nS 301=013\nR ab=ba\n")
    return dict(zip(["base", "ft1", "ft2"], folders), qa=str(qa), txt=str(txt), root=str(root))


def test_eval_command_table_json_and_independent_perplexity(char_family, tmp_path):
    out = tmp_path / "scores.json"
    r = CliRunner().invoke(main, ["eval", char_family["base"], char_family["ft1"], "--data", char_family["qa"],
                                  "--data", char_family["txt"], "--json", str(out), "--max-new-tokens", "4", "-q"])
    assert r.exit_code == 0, r.output
    assert "exact_match" in r.output and "perplexity" in r.output and "base" in r.output and "ft1" in r.output
    doc = json.loads(out.read_text())
    by = {(os.path.basename(s["model"]), s["data"]): s for s in doc["scores"]}
    assert by[("base", "rev")]["n"] == 6 and by[("base", "rev")]["ci_method"] == "wilson95"
    # the perplexity, recomputed with transformers' own loss, one document at a time
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(char_family["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(char_family["base"])
    total = count = 0.0
    for line in open(char_family["txt"]).read().splitlines():
        ids = torch.tensor([tok(line)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert by[("base", "text")]["value"] == pytest.approx(math.exp(total / count), rel=1e-4)
    lo, hi = by[("base", "text")]["ci_low"], by[("base", "text")]["ci_high"]
    assert lo <= by[("base", "text")]["value"] <= hi


def test_eval_command_clear_errors(char_family, tmp_path):
    r = CliRunner().invoke(main, ["eval", char_family["base"], "--lm-eval", "arc_easy"])
    if not __import__("importlib").util.find_spec("lm_eval"):
        assert r.exit_code == 1 and "lm-evaluation-harness" in r.output
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--data", char_family["qa"]])
    assert r.exit_code == 1 and "does not exist" in r.output
    if not __import__("importlib").util.find_spec("matplotlib"):
        r = CliRunner().invoke(main, ["eval", char_family["base"], "--data", char_family["qa"], "--plot", "x.png"])
        assert r.exit_code == 1 and "matplotlib" in r.output


def _recipe(family, tmp_path, name="recipe.yml", w1=0.5, w2=0.5) -> str:
    path = tmp_path / name
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n    parameters: {{weight: {w1}}}\n"
                    f"  - model: {family['ft2']}\n    parameters: {{weight: {w2}}}\ndtype: float32\n")
    return str(path)


def test_gate_fails_keeps_and_marks_the_output(char_family, tmp_path):
    gate = tmp_path / "gate.yml"
    gate.write_text(yaml.safe_dump({"data": [char_family["qa"], {"path": char_family["txt"], "name": "wiki"}],
                                    "checks": [{"data": "rev", "min": 0.99}, {"data": "wiki", "max_drop": 0.0}],
                                    "options": {"max_new_tokens": 4}}))
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["run", _recipe(char_family, tmp_path), str(out), "--eval-gate", str(gate), "-q"])
    assert r.exit_code == 1, r.output
    assert "evaluation gate failed" in r.output and "below the minimum 0.99" in r.output
    assert (out / "model.safetensors.index.json").exists()  # kept ...
    marker = json.loads((out / "EVAL_GATE_FAILED").read_text())  # ... but marked
    assert marker["passed"] is False and marker["failures"]
    assert {s["model"] for s in marker["scores"]} >= {str(out), char_family["ft1"], char_family["ft2"]}
    assert "Evaluation gate: FAILED" in (out / "README.md").read_text()


def test_gate_passes_and_records_scores(char_family, tmp_path):
    gate = tmp_path / "gate.yml"
    gate.write_text(yaml.safe_dump({"data": [char_family["txt"]], "checks": [{"data": "text", "max": 1e6}]}))
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["run", _recipe(char_family, tmp_path), str(out), "--eval-gate", str(gate), "-q"])
    assert r.exit_code == 0, r.output
    assert not (out / "EVAL_GATE_FAILED").exists()
    assert json.loads((out / "eval_gate.json").read_text())["passed"] is True
    assert "Evaluation gate: passed" in (out / "README.md").read_text()


def test_gate_compares_with_the_best_parent():
    from dmerge.gate import Check, Gate, check_scores

    def sc(model, value, metric="exact_match"):
        return Score(model, "d", metric, value, 0, 1, 10, "wilson95", metric != "perplexity")

    gate = Gate([], [Check("d", max_drop=0.1)], None)
    assert check_scores(gate, "out", [sc("out", 0.85), sc("a", 0.8), sc("b", 0.9)], ["a", "b"]) == []
    fails = check_scores(gate, "out", [sc("out", 0.79), sc("a", 0.8), sc("b", 0.9)], ["a", "b"])
    assert len(fails) == 1 and "parent b" in fails[0]
    ppl = [sc("out", 12.0, "perplexity"), sc("a", 10.0, "perplexity"), sc("b", 11.5, "perplexity")]
    assert check_scores(Gate([], [Check("d", max_drop=2.5)], None), "out", ppl, ["a", "b"]) == []
    assert check_scores(Gate([], [Check("d", max_drop=1.5)], None), "out", ppl, ["a", "b"])


def test_bad_gate_fails_before_merging(char_family, tmp_path):
    gate = tmp_path / "gate.yml"
    gate.write_text(yaml.safe_dump({"data": [char_family["txt"]], "checks": [{"data": "nope", "min": 1}]}))
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["run", _recipe(char_family, tmp_path), str(out), "--eval-gate", str(gate), "-q"])
    assert r.exit_code == 1 and "checks[0].data" in r.output
    assert not out.exists()


def test_search_space_defaults_and_spec():
    from dmerge.search import search_space

    data = {"merge_method": "ties", "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                       {"model": "y", "parameters": {"weight": 1.0, "density": 0.7}}],
            "parameters": {"normalize": True}}
    dims = {d.name: (d.low, d.high, d.start) for d in search_space(data)}
    assert set(dims) == {"models.0.parameters.weight.0", "models.0.parameters.weight.1",
                         "models.0.parameters.density", "models.1.parameters.weight", "models.1.parameters.density"}
    assert dims["models.0.parameters.density"][1] == 1.0 and dims["models.1.parameters.weight"][1] == 2.0
    data["search"] = {"models.1.parameters.weight": [0.5, 1.5]}
    assert [(d.name, d.low, d.high) for d in search_space(data)] == [("models.1.parameters.weight", 0.5, 1.5)]
    from dmerge.search import candidate

    cand = candidate(data, search_space(data), [1.23456])
    assert "search" not in cand and cand["models"][1]["parameters"]["weight"] == 1.2346
    assert data["models"][1]["parameters"]["weight"] == 1.0  # the recipe itself is left as it was
    data["search"] = {"models.5.parameters.weight": [0, 1]}
    with pytest.raises(DMergeError, match="names no value"):
        search_space(data)


def _search(char_family, tmp_path, log, trials=3, workdir=None):
    return CliRunner().invoke(main, [
        "search", _recipe(char_family, tmp_path, w1=0.5, w2=0.5), "--eval", char_family["txt"],
        "--holdout", char_family["qa"], "--trials", str(trials), "--population", "4", "--out",
        str(tmp_path / "best.yml"), "--log", str(log), "--workdir", str(workdir or tmp_path / "work"),
        "--max-new-tokens", "4", "-q", "--threads-per-worker", "1"])


def test_search_three_trials_then_resume_after_an_interrupted_log(char_family, tmp_path):
    from dmerge.recipe import load_recipe
    from dmerge.search import read_log

    log = tmp_path / "trials.jsonl"
    r = _search(char_family, tmp_path, log)
    assert r.exit_code == 0, r.output
    header, trials = read_log(str(log))
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert trials[0]["params"] == {"models.0.parameters.weight": 0.5, "models.1.parameters.weight": 0.5}
    assert all(math.isfinite(t["objective"]) for t in trials)
    assert set(trials[0]["scores"]) == {"text"} and [s["data"] for s in trials[0]["holdout"]] == ["rev"]
    assert trials[1]["params"] != trials[2]["params"]
    assert os.listdir(tmp_path / "work") == []  # every candidate removed
    best = (tmp_path / "best.yml").read_text()
    assert "# held-out split" in best and "search split" in best
    load_recipe(str(tmp_path / "best.yml"))  # the best recipe is a valid recipe
    assert "held-out objective" in r.output
    best_trial = max(trials, key=lambda t: (t["objective"], -t["trial"]))
    assert f"trial {best_trial['trial']} of 3" in best

    # a crash after trial 1, mid-way through writing trial 2: the log ends in a torn line
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    r = _search(char_family, tmp_path, log, trials=6)  # and on: generation 0 complete, told, then one more
    assert r.exit_code == 0, r.output
    _, again = read_log(str(log))
    assert [t["trial"] for t in again] == [0, 1, 2, 3, 4, 5]
    assert [t["generation"] for t in again] == [-1, 0, 0, 0, 0, 1]
    assert again[:2] == trials[:2]  # logged trials are not rerun
    assert again[2]["unit"] == pytest.approx(trials[2]["unit"])  # the same point proposed again
    assert again[2]["objective"] == pytest.approx(trials[2]["objective"], abs=1e-9)

    # a log from another search is refused
    other = tmp_path / "other.yml"
    other.write_text(_recipe(char_family, tmp_path, "x.yml", w1=0.3) and open(tmp_path / "x.yml").read())
    r = CliRunner().invoke(main, ["search", str(other), "--eval", char_family["txt"], "--trials", "2",
                                  "--log", str(log), "--out", str(tmp_path / "b2.yml"), "-q"])
    assert r.exit_code == 1 and "belongs to another search" in r.output


def test_eval_reads_a_model_from_a_storage_url(char_family):
    """A model at an fsspec URL (here the in-memory filesystem) scores as its local copy."""
    import fsspec

    from dmerge.evaluate import evaluate

    fs = fsspec.filesystem("memory")
    for name in os.listdir(char_family["ft1"]):
        fs.pipe(f"/evalmodel/{name}", open(os.path.join(char_family["ft1"], name), "rb").read())
    data = [load_data(char_family["txt"])]
    remote, local = evaluate(["memory://evalmodel", char_family["ft1"]], data, EvalOptions(quiet=True))
    assert remote.model == "memory://evalmodel" and remote.value == pytest.approx(local.value, rel=1e-12)


def test_eval_on_a_dask_cluster_matches_in_process(char_family, tmp_path):
    """With --scheduler each model is a task on the cluster; the scores are the same."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        outs = []
        for extra in ([], ["--scheduler", cluster.scheduler_address]):
            out = tmp_path / f"s{len(extra)}.json"
            r = CliRunner().invoke(main, ["eval", char_family["base"], char_family["ft2"], "--data", char_family["qa"],
                                          "--data", char_family["txt"], "--json", str(out), "--max-new-tokens", "4",
                                          "-q", *extra])
            assert r.exit_code == 0, r.output
            outs.append([(s["model"], s["data"], s["value"]) for s in json.loads(out.read_text())["scores"]])
    assert outs[0] == outs[1]


def test_proposals_are_seeded_and_inside_the_box():
    from dmerge.search import _Proposer

    for strategy in ("cmaes", "random"):
        a, b = _Proposer(strategy, [0.2, 0.9, 0.5], 7, None), _Proposer(strategy, [0.2, 0.9, 0.5], 7, None)
        pa, pb = a.ask(), b.ask()
        assert pa == pb and len(pa) == a.population >= 4
        assert all(0.0 <= x <= 1.0 for p in pa for x in p)
        assert _Proposer(strategy, [0.2, 0.9, 0.5], 8, None).ask() != pa
    with pytest.raises(DMergeError, match="unknown search strategy"):
        _Proposer("grid", [0.5], 0, None)


def test_search_logs_a_candidate_that_cannot_merge_as_a_failed_trial(char_family, tmp_path):
    from dmerge.search import read_log

    recipe = tmp_path / "r.yml"
    # the searched box holds only weights summing to 0, which linear refuses; trial 0 is as written
    recipe.write_text(open(_recipe(char_family, tmp_path)).read() +
                      "search:\n  models.0.parameters.weight: [0, 0]\n  models.1.parameters.weight: [0, 0]\n")
    r = CliRunner().invoke(main, ["search", str(recipe), "--eval", char_family["txt"], "--trials", "2",
                                  "--out", str(tmp_path / "best.yml"), "--threads-per-worker", "1"])
    assert r.exit_code == 0, r.output
    _, trials = read_log(str(tmp_path / "best.trials.jsonl"))
    assert trials[0]["params"] == {"models.0.parameters.weight": 0.5, "models.1.parameters.weight": 0.5}
    assert trials[1]["objective"] is None and "sum to 0" in trials[1]["error"]
    assert "trial 0 of 2" in (tmp_path / "best.yml").read_text()
    assert "search" not in yaml.safe_load((tmp_path / "best.yml").read_text())


def test_long_documents_are_scored_in_windows():
    model = _FixedLogits(torch.zeros(9, 9), context=4096)
    r = score_perplexity(model, _IdTokenizer(), ["abcdefg"], EvalOptions(max_length=3, quiet=True))
    assert r["extra"]["tokens"] == 4  # windows abc, def (2 predicted each); g alone predicts nothing
    assert r["value"] == pytest.approx(9, rel=1e-6)
