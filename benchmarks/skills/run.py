"""The skills benchmark: does a dmerge merge keep the skills of its parents?

One command, offline, CPU only, a few minutes on 2 cores::

    python benchmarks/skills/run.py [--workdir DIR] [--trials N] [--no-docs]

1. A tiny decoder (transformers Llama, 2 layers, hidden 64, random init) is pretrained on a
   generated mixture (copying strings, reversing letter strings, sorting digit strings)
   just long enough for broad but partial competence in the two skills.
2. Two light fine-tunes of it, each mostly on one skill (with some of the pretraining
   mixture replayed): ``ft_reverse`` and ``ft_sort``.
3. dmerge merges the two fine-tunes with hand-written recipes of several methods, and
   every model is scored (exact match, greedy decoding) on held-out problems of both
   skills, never trained on.
4. ``dmerge search`` tunes one recipe's parameters on a separate *search* split and the
   result is checked on the held-out split.

The table, the share of each parent's gain over the base kept by each merge, and a chart
go into docs/benchmarks.md (between the skills markers) and docs/skills-benchmark.svg.
Seeded throughout: the same numbers on every run on the same software.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tasks import write_eval_sets  # noqa: E402
from train import load_tokenizer, new_model, save, train  # noqa: E402

SEED = 0
PRETRAIN = {"copy": 0.45, "reverse": 0.45, "sort": 0.1}
PRETRAIN_STEPS, PRETRAIN_LR = 200, 3e-3
FINETUNE_STEPS, FINETUNE_LR, REPLAY = 100, 4e-4, 0.5
PER_SPLIT = 1000  # problems per skill per split

# Hand-written recipes: what a person would try first for two fine-tunes of one base.
RECIPES = {
    "linear": """merge_method: linear
models:
  - model: ft_reverse
    parameters: {weight: 0.5}
  - model: ft_sort
    parameters: {weight: 0.5}
dtype: float32
""",
    "task_arithmetic_1.0": """merge_method: task_arithmetic
base_model: base
models:
  - model: ft_reverse
    parameters: {weight: 1.0}
  - model: ft_sort
    parameters: {weight: 1.0}
dtype: float32
""",
    "task_arithmetic_0.7": """merge_method: task_arithmetic
base_model: base
models:
  - model: ft_reverse
    parameters: {weight: 0.7}
  - model: ft_sort
    parameters: {weight: 0.7}
dtype: float32
""",
    "ties": """merge_method: ties
base_model: base
models:
  - model: ft_reverse
    parameters: {weight: 1.0, density: 0.5}
  - model: ft_sort
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
""",
    "dare_ties": """merge_method: dare_ties
base_model: base
models:
  - model: ft_reverse
    parameters: {weight: 1.0, density: 0.5}
  - model: ft_sort
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
""",
    "dare_linear": """merge_method: dare_linear
base_model: base
models:
  - model: ft_reverse
    parameters: {weight: 0.7, density: 0.7}
  - model: ft_sort
    parameters: {weight: 0.7, density: 0.7}
dtype: float32
""",
    "slerp": """merge_method: slerp
base_model: ft_reverse
models:
  - model: ft_sort
parameters:
  t: 0.5
dtype: float32
""",
    "model_stock": """merge_method: model_stock
base_model: base
models:
  - model: ft_reverse
  - model: ft_sort
dtype: float32
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: base
models:
  - model: ft_reverse
    parameters: {weight: 1.0, density: 0.8, gamma: 0.02}
  - model: ft_sort
    parameters: {weight: 1.0, density: 0.8, gamma: 0.02}
dtype: float32
""",
}

# The recipe the search starts from, and what it searches: the two weights of a task
# arithmetic merge (the simplest method with a free scale per parent).
SEARCH_START = "task_arithmetic_0.7"


def build_models(work: str, reserved: set[str], log) -> dict[str, str]:
    """Pretrain the base and fine-tune the two specialists; returns their folders."""
    tok_dir = os.path.join(work, "tokenizer")
    from tasks import write_char_tokenizer

    write_char_tokenizer(tok_dir)
    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    base = new_model(SEED)
    losses = train(base, tok, PRETRAIN, PRETRAIN_STEPS, PRETRAIN_LR, SEED + 1, reserved)
    log(f"pretrained base: {PRETRAIN_STEPS} steps, loss {losses[0]} -> {losses[-1]} ({time.perf_counter() - t0:.0f} s)")
    folders = {"base": save(base, os.path.join(work, "base"))}
    for i, skill in enumerate(("reverse", "sort")):
        t0 = time.perf_counter()
        ft = copy.deepcopy(base)
        mixture = {k: REPLAY * v + (1 - REPLAY) * (k == skill) for k, v in PRETRAIN.items()}
        losses = train(ft, tok, mixture, FINETUNE_STEPS, FINETUNE_LR, SEED + 2 + i, reserved, warmup=10)
        log(f"fine-tuned ft_{skill}: {FINETUNE_STEPS} steps, loss {losses[0]} -> {losses[-1]} "
            f"({time.perf_counter() - t0:.0f} s)")
        folders[f"ft_{skill}"] = save(ft, os.path.join(work, f"ft_{skill}"))
    return folders


def paired_difference(a: dict, b: dict, data: dict, resamples: int = 2000) -> dict:
    """Mean accuracy (over the skills) of ``a`` minus ``b`` on the same held-out problems,
    with a 95 % paired-bootstrap interval (problems resampled within each skill, seeded)."""
    from dmerge.evaluate import exact_match

    diffs = {}
    for name, d in data.items():
        answers = [r["answer"] for r in d.records]
        ca = [exact_match(p, t) for p, t in zip(a[name].extra["predictions"], answers)]
        cb = [exact_match(p, t) for p, t in zip(b[name].extra["predictions"], answers)]
        diffs[name] = torch.tensor(ca, dtype=torch.float64) - torch.tensor(cb, dtype=torch.float64)
    g = torch.Generator().manual_seed(SEED)
    boot = sum(v[torch.randint(0, len(v), (resamples, len(v)), generator=g)].mean(1) for v in diffs.values()) / len(diffs)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"difference": float(sum(v.mean() for v in diffs.values()) / len(diffs)), "ci_low": lo, "ci_high": hi,
            "only_a": {k: int((v > 0).sum()) for k, v in diffs.items()},
            "only_b": {k: int((v < 0).sum()) for k, v in diffs.items()}}


def gain_kept(merged: float, base: float, parent: float) -> float | None:
    """The share of the parent's gain over the base that the merge keeps."""
    gain = parent - base
    return None if abs(gain) < 1e-9 else (merged - base) / gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="where models and data go (default: a temporary folder)")
    ap.add_argument("--trials", type=int, default=40, help="trials of the recipe search (0: no search)")
    ap.add_argument("--no-docs", action="store_true", help="print the results only")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine; one thread also keeps the training bit-reproducible
    torch.use_deterministic_algorithms(True)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    own = args.workdir is None
    work = args.workdir or tempfile.mkdtemp(prefix="dmerge-skills-")
    os.makedirs(work, exist_ok=True)

    from dmerge.evaluate import EvalOptions, evaluate, load_data
    from dmerge.execute import ClusterOptions, run_plan
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    paths, reserved = write_eval_sets(os.path.join(work, "data"), SEED + 100, PER_SPLIT)
    folders = build_models(work, reserved, log)
    t_train = time.perf_counter() - started

    # one in-process cluster for every merge and evaluation of the benchmark
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0",
                           silence_logs=50)
    client = Client(cluster)
    address = cluster.scheduler_address
    t0 = time.perf_counter()
    merged = {}
    for name, text in RECIPES.items():
        path = os.path.join(work, f"{name}.yml")
        with open(path, "w") as f:
            f.write(text)
        out = os.path.join(work, "merged", name)
        run_plan(build_plan(load_recipe(path), seed=SEED), out, cluster=ClusterOptions(scheduler=address),
                 quiet=True, overwrite=True)
        merged[name] = out
    t_merge = time.perf_counter() - t0
    log(f"merged {len(merged)} recipes ({t_merge:.0f} s)")

    options = EvalOptions(batch_size=250, max_new_tokens=8, quiet=True, keep_predictions=True)
    holdout = [load_data(paths[("reverse", "holdout")], "reverse"), load_data(paths[("sort", "holdout")], "sort")]
    models = {**folders, **merged}
    t0 = time.perf_counter()
    scores = evaluate(list(models.values()), holdout, options, client=client)
    t_eval = time.perf_counter() - t0
    acc = {name: {s.data: s for s in scores if s.model == loc} for name, loc in models.items()}
    for name, by_data in acc.items():  # results name models, not the (temporary) folders
        for s in by_data.values():
            s.model = name
    log(f"evaluated {len(models)} models on {2 * PER_SPLIT} held-out problems each ({t_eval:.0f} s)")

    search = None
    if args.trials > 0:
        from dmerge.search import objective, run_search

        t0 = time.perf_counter()
        search_sets = [load_data(paths[("reverse", "search")], "reverse"), load_data(paths[("sort", "search")], "sort")]
        start = os.path.join(work, f"{SEARCH_START}.yml")
        log_path = os.path.join(work, "search.trials.jsonl")
        if os.path.exists(log_path):
            os.remove(log_path)
        res = run_search(start, search_sets, holdout, trials=args.trials, log_path=log_path,
                         out_path=os.path.join(work, "best.yml"), seed=SEED, options=options, scheduler=address,
                         quiet=True, echo=log)
        t_search = time.perf_counter() - t0
        for s in res.best_holdout:
            s.model = "search best"
        search = {"trials": len(res.trials), "best_trial": res.best["trial"], "params": res.best["params"],
                  "search_objective": res.best["objective"], "start_search_objective": res.start["objective"],
                  "holdout": {s.data: s.to_json() for s in res.best_holdout},
                  "holdout_objective": objective(res.best_holdout), "seconds": t_search,
                  "best_recipe": res.best_recipe_text}
        best_hand = max((n for n in merged), key=lambda n: sum(s.value for s in acc[n].values()))
        search["versus"] = best_hand
        search["paired_difference"] = paired_difference(
            {s.data: s for s in res.best_holdout}, acc[best_hand], {d.name: d for d in holdout})
        log(f"search: {len(res.trials)} trials, best trial {res.best['trial']} ({t_search:.0f} s)")
    client.close()
    cluster.close()

    results = {"accuracy": {n: {k: s.to_json() for k, s in a.items()} for n, a in acc.items()},
               "search": search, "seconds": {"train": t_train, "merge": t_merge, "eval": t_eval,
                                             "total": time.perf_counter() - started},
               "settings": {"pretrain": PRETRAIN, "pretrain_steps": PRETRAIN_STEPS, "finetune_steps": FINETUNE_STEPS,
                            "finetune_lr": FINETUNE_LR, "replay": REPLAY, "per_split": PER_SPLIT}}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report = markdown(results)
    print(report)
    if not args.no_docs:
        write_docs(report, results)
    if own:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _row_values(results: dict, name: str) -> tuple[float, float]:
    a = results["accuracy"][name]
    return a["reverse"]["value"], a["sort"]["value"]


def markdown(results: dict) -> str:
    """The benchmark's section of docs/benchmarks.md."""
    acc = results["accuracy"]
    b_r, b_s = _row_values(results, "base")
    r_r, _ = _row_values(results, "ft_reverse")
    _, s_s = _row_values(results, "ft_sort")
    n = results["settings"]["per_split"]
    lines = ["| model | reverse | sort | mean | reverse gain kept | sort gain kept |", "|---|---|---|---|---|---|"]
    ranked = []
    for name in acc:
        r, s = _row_values(results, name)
        ci = {k: acc[name][k] for k in ("reverse", "sort")}
        keep_r, keep_s = gain_kept(r, b_r, r_r), gain_kept(s, b_s, s_s)
        is_merge = name not in ("base", "ft_reverse", "ft_sort")
        kr = f"{keep_r:.0%}" if is_merge and keep_r is not None else ""
        ks = f"{keep_s:.0%}" if is_merge and keep_s is not None else ""
        lines.append(f"| {name} | {r:.3f} [{ci['reverse']['ci_low']:.2f}, {ci['reverse']['ci_high']:.2f}] | "
                     f"{s:.3f} [{ci['sort']['ci_low']:.2f}, {ci['sort']['ci_high']:.2f}] | {(r + s) / 2:.3f} | {kr} | {ks} |")
        if is_merge:
            ranked.append(((r + s) / 2, name, keep_r, keep_s))
    search = results.get("search")
    if search:
        h = search["holdout"]
        r, s = h["reverse"]["value"], h["sort"]["value"]
        lines.append(f"| search best (trial {search['best_trial']}) | {r:.3f} [{h['reverse']['ci_low']:.2f}, "
                     f"{h['reverse']['ci_high']:.2f}] | {s:.3f} [{h['sort']['ci_low']:.2f}, {h['sort']['ci_high']:.2f}] | "
                     f"{(r + s) / 2:.3f} | {gain_kept(r, b_r, r_r):.0%} | {gain_kept(s, b_s, s_s):.0%} |")
    ranked.sort(reverse=True)
    best = ranked[0]
    sec = results["seconds"]
    st = results["settings"]
    out = [
        "<!-- skills:begin (written by benchmarks/skills/run.py; do not edit by hand) -->",
        "## Skills benchmark: does a merge keep both parents' skills?",
        "",
        "`python benchmarks/skills/run.py` (offline, CPU, one thread for training). A tiny Llama decoder "
        "(2 layers, hidden 64, character tokens, random init) is pretrained for "
        f"{st['pretrain_steps']} steps on a generated mixture ({', '.join(f'{k} {v:.0%}' for k, v in st['pretrain'].items())}: "
        "copy a string, reverse a string of letters, sort a string of digits) to broad but partial competence; two "
        f"light fine-tunes ({st['finetune_steps']} steps at lr {st['finetune_lr']}, {st['replay']:.0%} of each batch "
        "replaying the pretraining mixture) specialise it in one skill each. dmerge merges the two fine-tunes "
        "with the recipes in `benchmarks/skills/run.py`; every model is scored by `dmerge.evaluate` (greedy "
        f"decoding, exact match) on {n} held-out problems per skill that no training step saw. Brackets: 95 % "
        "Wilson intervals. *Gain kept* = (merge - base) / (specialist - base) on that skill: 100 % keeps all of "
        "the specialist's improvement, 0 % none, negative: worse than the base.",
        "",
        *lines,
        "",
        f"Best hand-written merge by mean accuracy: **{best[1]}** ({best[0]:.3f}), keeping {best[2]:.0%} of the "
        f"reversal specialist's gain and {best[3]:.0%} of the sorting specialist's.",
    ]
    if search:
        start_h = results["accuracy"][SEARCH_START]
        start_mean = (start_h["reverse"]["value"] + start_h["sort"]["value"]) / 2
        beats = search["holdout_objective"] > best[0]
        out += ["",
                f"`dmerge search` (CMA-ES, {search['trials']} trials, each a merge and an evaluation on the cluster) "
                f"tuned the two weights of `{SEARCH_START}` on a separate *search* split ({n} problems per skill): "
                f"best trial {search['best_trial']}, weights "
                + ", ".join(f"{v:g}" for v in search["params"].values())
                + f"; search-split mean {search['search_objective']:.3f} (start {search['start_search_objective']:.3f}). "
                f"On the held-out split it scores **{search['holdout_objective']:.3f}** against {start_mean:.3f} for "
                f"its starting recipe and {best[0]:.3f} for the best hand-written one: the searched recipe "
                + ("beats every hand-written recipe on the held-out split" if beats else
                   "does **not** beat the best hand-written recipe on the held-out split")
                + _paired_text(search) + f" The search took {search['seconds']:.0f} s."]
    out += ["",
            f"Run time: training {sec['train']:.0f} s, {len(RECIPES)} merges {sec['merge']:.0f} s, evaluation "
            f"{sec['eval']:.0f} s, total {sec['total']:.0f} s (2-core VM shared with other work).",
            "",
            "![skills chart](skills-benchmark.svg)",
            "<!-- skills:end -->"]
    return "\n".join(out)


def _paired_text(search: dict) -> str:
    p = search["paired_difference"]
    only_a, only_b = sum(p["only_a"].values()), sum(p["only_b"].values())
    sure = p["ci_low"] > 0 or p["ci_high"] < 0
    return (f" (paired on the same problems, searched minus {search['versus']}: {p['difference']:+.3f}, 95 % "
            f"paired-bootstrap interval [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]; {only_a} problems only the "
            f"searched recipe solves, {only_b} only {search['versus']}"
            + ("" if sure else "; the interval includes 0, so the difference is within noise") + ").")


def write_docs(report: str, results: dict) -> None:
    docs = os.path.join(ROOT, "docs")
    path = os.path.join(docs, "benchmarks.md")
    text = open(path, encoding="utf-8").read()
    begin, end = text.find("<!-- skills:begin"), text.find("<!-- skills:end -->")
    if begin >= 0 and end > begin:
        text = text[:begin] + report + text[end + len("<!-- skills:end -->"):]
    else:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(docs, "skills-benchmark.svg"), "w", encoding="utf-8") as f:
        f.write(svg_chart(results))


def svg_chart(results: dict) -> str:
    """A grouped bar chart (reverse and sort accuracy per model), as plain SVG: no plotting library needed."""
    rows = [(n, *_row_values(results, n)) for n in results["accuracy"]]
    if results.get("search"):
        h = results["search"]["holdout"]
        rows.append(("search best", h["reverse"]["value"], h["sort"]["value"]))
    bar, gap, left, top, height = 14, 16, 50, 30, 220
    width = left + len(rows) * (2 * bar + gap) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 120}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="18" font-size="13">Held-out exact-match accuracy (skills benchmark)</text>']
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + height * (1 - v)
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i, (name, r, s) in enumerate(rows):
        x = left + 8 + i * (2 * bar + gap)
        for j, (v, color) in enumerate(((r, "#4c72b0"), (s, "#dd8452"))):
            out.append(f'<rect x="{x + j * bar}" y="{top + height * (1 - v):.1f}" width="{bar - 1}" '
                       f'height="{height * v:.1f}" fill="{color}"><title>{name}: {v:.3f}</title></rect>')
        out.append(f'<text transform="translate({x + bar},{top + height + 8}) rotate(45)">{name}</text>')
    lx = width - 150
    out += [f'<rect x="{lx}" y="8" width="10" height="10" fill="#4c72b0"/>',
            f'<text x="{lx + 14}" y="17">reverse</text>',
            f'<rect x="{lx + 70}" y="8" width="10" height="10" fill="#dd8452"/>',
            f'<text x="{lx + 84}" y="17">sort</text>', "</svg>"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
