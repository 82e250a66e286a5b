"""FrankenMoE assembly (`dmerge moe`): tiny Llama, Qwen2 and Qwen3 families built on the
fly become a Mixtral, a Qwen2-MoE (shared expert) and a Qwen3-MoE; each loads in
transformers and generates, expert bytes are their sources', the layer-by-layer prompt
pass equals a full forward, and the routers agree with mergekit-moe's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from dmerge.cli import main

VOCAB = 512
TOPICS = ["cat dog bird fish horse cow sheep goat mouse rabbit duck frog",
          "red blue green yellow purple orange black white pink brown gray gold",
          "one two three four five six seven eight nine ten eleven twelve"]

# Prompts of three experts over disjoint words. The eval prompts are held out: new
# sentences of each expert's words (random toy weights give unseen words no meaning).
# A leading space makes every word one token wherever it stands (byte-level BPE).
EXPERTS = [
    dict(positive_prompts=[" cat dog bird fish", " horse cow sheep goat mouse", " rabbit duck frog"],
         eval_prompts=[" dog sheep frog bird", " duck fish cow cat"]),
    dict(positive_prompts=[" red blue green", " yellow purple orange black", " white pink brown gray gold"],
         eval_prompts=[" pink red gold blue", " gray green black"]),
    dict(positive_prompts=[" one two three four five", " six seven", " eight nine ten eleven twelve"],
         eval_prompts=[" three seven eleven", " twelve one six nine"]),
]


def write_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer trained on the topic words (every word one token), as
    tokenizer.json: the tokenizer class transformers picks for Qwen2/Qwen3 (by model
    type) rebuilds it from the vocabulary and merges, which a word-level one has not."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" " + " ".join(TOPICS)] * 20, vocab_size=VOCAB, min_frequency=1,
                            special_tokens=["<unk>", "<s>", "</s>"])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>"}, f)


def _config(kind: str):
    import transformers

    common = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    return transformers.Qwen3Config(**common, head_dim=32)


def _family(root: str, kind: str, n_experts: int = 3, seed: int = 0, config=None) -> dict[str, str]:
    """A base and fine-tunes of it (the base plus a small perturbation), bf16, with a tokenizer."""
    import transformers

    torch.manual_seed(seed)
    cfg = config or _config(kind)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    folders = {}
    for i in range(n_experts + 1):
        name = "base" if i == 0 else f"ft{i}"
        if i:
            g = torch.Generator().manual_seed(seed * 100 + i)
            model.load_state_dict({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
                                   for k, v in base.items()})
        folder = os.path.join(root, kind, name)
        model.save_pretrained(folder)
        write_tokenizer(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe"))
    return {kind: _family(root, kind) for kind in ("llama", "qwen2", "qwen3")}


def _recipe(fam: dict, gate_mode: str = "hidden", shared: bool = False, experts=EXPERTS, extra: str = "") -> str:
    import yaml

    doc = {"base_model": fam["base"], "gate_mode": gate_mode, "dtype": "bfloat16", "experts_per_token": 1,
           "experts": [dict(source_model=fam[f"ft{i + 1}"], **e) for i, e in enumerate(experts)]}
    if shared:
        doc["experts"] = doc["experts"][:2]
        doc["shared_experts"] = [dict(source_model=fam["ft3"], positive_prompts=["cat red one", "blue dog"])]
    return yaml.safe_dump(doc) + extra


def _run_moe(tmp_path, text: str, out: str, *args, command: str = "moe") -> str:
    path = tmp_path / f"{os.path.basename(out)}.yml"
    path.write_text(text)
    result = CliRunner().invoke(main, [command, str(path), out, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _raw(folder: str, name: str) -> bytes:
    """The stored bytes of one tensor of a model folder."""
    index = os.path.join(folder, "model.safetensors.index.json")
    file = "model.safetensors"
    if os.path.exists(index):
        file = json.load(open(index))["weight_map"][name]
    with safe_open(os.path.join(folder, file), "pt") as f:
        return f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _tensor(folder: str, name: str) -> torch.Tensor:
    index = os.path.join(folder, "model.safetensors.index.json")
    file = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
    with safe_open(os.path.join(folder, file), "pt") as f:
        return f.get_tensor(name)


def _loads_and_generates(folder: str, arch: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == arch
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("<s>cat dog red", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    return model, tok


def _top1_by_layer(model, tok, prompt: str) -> list[int]:
    """The expert the built model routes a prompt to top-1 in each layer (router logits
    averaged over its tokens)."""
    ids = tok("<s>" + prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    return [int(logits.float().mean(dim=0).argmax()) for logits in out.router_logits]


def test_mixtral_from_llama_experts(families, tmp_path):
    fam = families["llama"]
    out = str(tmp_path / "mixtral")
    printed = _run_moe(tmp_path, _recipe(fam, "router_input"), out)
    assert "routing report (router_input gates" in printed
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 3
    assert cfg["num_experts_per_tok"] == 1
    # each expert's MLP bytes are its source's; attention and norms are the base's
    for layer in range(4):
        for e in range(3):
            for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                assert _raw(out, f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight") == \
                    _raw(fam[f"ft{e + 1}"], f"model.layers.{layer}.mlp.{proj}.weight")
        assert _raw(out, f"model.layers.{layer}.self_attn.q_proj.weight") == \
            _raw(fam["base"], f"model.layers.{layer}.self_attn.q_proj.weight")
        assert _tensor(out, f"model.layers.{layer}.block_sparse_moe.gate.weight").shape == (3, 128)
    model, tok = _loads_and_generates(out, "MixtralForCausalLM")
    # held-out prompts of each expert go to it top-1 in most layers of the built model
    for e, spec in enumerate(EXPERTS):
        for prompt in spec["eval_prompts"]:
            layers = _top1_by_layer(model, tok, prompt)
            assert sum(x == e for x in layers) > len(layers) / 2, (e, prompt, layers)
    report = json.load(open(os.path.join(out, "routing_report.json")))
    assert report["gate_mode"] == "router_input" and len(report["per_layer"]) == 4
    assert report["overall"] >= 0.9, report


def test_hidden_gates_agree_with_mergekit_moe(families, tmp_path):
    """Differential: the same recipe through mergekit-moe; router rows cosine >= 0.99."""
    if shutil.which("mergekit-moe") is None:
        pytest.skip("mergekit-moe is not installed")
    fam = families["llama"]
    experts = [dict(e) for e in EXPERTS]
    experts[1]["negative_prompts"] = ["w1 w2 w3"]
    text = _recipe(fam, "hidden", experts=[{k: v for k, v in e.items() if k != "eval_prompts"} for e in experts])
    ours = str(tmp_path / "ours")
    _run_moe(tmp_path, text, ours)
    theirs = str(tmp_path / "theirs")
    (tmp_path / "mk.yml").write_text(text)
    done = subprocess.run(["mergekit-moe", str(tmp_path / "mk.yml"), theirs, "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for layer in range(4):
        a = _tensor(ours, f"model.layers.{layer}.block_sparse_moe.gate.weight").float()
        b = _tensor(theirs, f"model.layers.{layer}.mlp.gate.weight").float()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert bool((cos >= 0.99).all()), (layer, cos)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_layer_by_layer_pass_equals_full_forward(families, kind):
    """The chain of one-layer tasks gives transformers' hidden_states of a full forward,
    with every weight read in blocks of MATMUL_ROWS rows (the smallest budget)."""
    import transformers

    from dmerge.moe.plan import build_moe_plan
    from dmerge.moe.recipe import load_moe_recipe

    fam = families[kind]
    plan = build_moe_plan(load_moe_recipe(_recipe(fam, "hidden", shared=kind == "qwen2"), is_text=True),
                          chunk_bytes=1)
    rp = plan.computations[0]
    ids, mask = rp.prompts.tensors()
    assert bool((mask[:, 0] == 0).any()), "the prompts should need left padding"
    full = transformers.AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
    with torch.no_grad():
        expected = full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    import dmerge.moe.hidden as hidden

    hidden.MATMUL_ROWS, saved = 32, hidden.MATMUL_ROWS  # several blocks per weight even in these tiny layers
    try:
        check_chain(rp, ids, mask, expected)
    finally:
        hidden.MATMUL_ROWS = saved


def check_chain(rp, ids, mask, expected):
    from dmerge.moe.hidden import embed_prompts, run_layer

    state = embed_prompts(rp)
    real = mask.bool()  # padding positions are masked out of everything that reads them
    for i in range(rp.n_layers):
        torch.testing.assert_close(state.hidden[real], expected[i][real], atol=2e-5, rtol=1e-5)
        state = run_layer(rp, i, state)
    assert state.hidden is None  # the last layer hands nothing on


def test_qwen2_moe_with_shared_expert(families, tmp_path):
    fam = families["qwen2"]
    out = str(tmp_path / "qwen2moe")
    _run_moe(tmp_path, _recipe(fam, "hidden", shared=True), out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["num_experts"] == 2 and cfg["qkv_bias"] is True
    for layer in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for e in range(2):
                assert _raw(out, f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight") == \
                    _raw(fam[f"ft{e + 1}"], f"model.layers.{layer}.mlp.{proj}.weight")
            assert _raw(out, f"model.layers.{layer}.mlp.shared_expert.{proj}.weight") == \
                _raw(fam["ft3"], f"model.layers.{layer}.mlp.{proj}.weight")
        assert _tensor(out, f"model.layers.{layer}.mlp.shared_expert_gate.weight").shape == (1, 128)
        assert _raw(out, f"model.layers.{layer}.self_attn.q_proj.bias") == \
            _raw(fam["base"], f"model.layers.{layer}.self_attn.q_proj.bias")
    _loads_and_generates(out, "Qwen2MoeForCausalLM")


def test_qwen3_moe_through_dmerge_run(families, tmp_path):
    """The `merge_method: moe` form of an ordinary recipe, through `dmerge run`."""
    fam = families["qwen3"]
    out = str(tmp_path / "qwen3moe")
    _run_moe(tmp_path, "merge_method: moe\n" + _recipe(fam, "router_input"), out, command="run")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 3
    for e in range(3):
        assert _raw(out, f"model.layers.2.mlp.experts.{e}.down_proj.weight") == \
            _raw(fam[f"ft{e + 1}"], "model.layers.2.mlp.down_proj.weight")
    assert _raw(out, "model.layers.1.self_attn.q_norm.weight") == _raw(fam["base"], "model.layers.1.self_attn.q_norm.weight")
    model, tok = _loads_and_generates(out, "Qwen3MoeForCausalLM")
    for e, spec in enumerate(EXPERTS):
        layers = _top1_by_layer(model, tok, spec["eval_prompts"][0])
        assert sum(x == e for x in layers) > len(layers) / 2, (e, layers)


@pytest.mark.parametrize("mode", ["cheap_embed", "random", "uniform_random"])
def test_other_gate_modes(families, tmp_path, mode):
    fam = families["llama"]
    out = str(tmp_path / mode)
    _run_moe(tmp_path, _recipe(fam, mode), out, "--random-seed", "3")
    rows = torch.stack([_tensor(out, f"model.layers.{i}.block_sparse_moe.gate.weight").float() for i in range(4)])
    if mode == "cheap_embed":  # the same rows in every layer, unit norm
        assert torch.equal(rows[0], rows[3])
        torch.testing.assert_close(rows[0].norm(dim=-1), torch.ones(3), atol=1e-2, rtol=0)
    elif mode == "uniform_random":
        assert float(rows.abs().max()) <= 128 ** -0.5
    else:
        assert not torch.equal(rows[0], rows[1])
    _loads_and_generates(out, "MixtralForCausalLM")


def test_bytes_independent_of_chunk_size_and_scales(families, tmp_path):
    """Noise and residual scale applied; output bytes the same for any chunk size and
    worker count (the router pass reads its weights in smaller blocks then)."""
    fam = families["llama"]
    experts = [dict(e) for e in EXPERTS]
    experts[0]["noise_scale"] = 0.01
    experts[2]["residual_scale"] = 0.5
    text = _recipe(fam, "hidden", experts=experts)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run_moe(tmp_path, text, a, "-q")
    _run_moe(tmp_path, text, b, "-q", "--chunk-size", "4K", "--workers", "2", "--threads-per-worker", "1")
    assert open(os.path.join(a, "model.safetensors"), "rb").read() == open(os.path.join(b, "model.safetensors"), "rb").read()
    down = _tensor(a, "model.layers.1.block_sparse_moe.experts.2.w2.weight").double()
    src = _tensor(fam["ft3"], "model.layers.1.mlp.down_proj.weight").double()
    torch.testing.assert_close(down, (src * 0.5).to(torch.bfloat16).double())
    noisy = _tensor(a, "model.layers.1.block_sparse_moe.experts.0.w1.weight").double()
    clean = _tensor(fam["ft1"], "model.layers.1.mlp.gate_proj.weight").double()
    assert 0.007 < float((noisy - clean).std()) < 0.013


def test_nearly_parallel_rows_warn(families, tmp_path):
    fam = families["llama"]
    experts = [dict(e) for e in EXPERTS]
    experts[1] = dict(experts[0])  # two experts with the same prompts
    path = tmp_path / "same.yml"
    path.write_text(_recipe(fam, "hidden", experts=experts))
    result = CliRunner().invoke(main, ["moe", str(path), str(tmp_path / "same"), "-q"])
    assert result.exit_code == 0, result.output
    assert "nearly parallel" in result.output and "0: " in result.output


def test_refuses_mismatched_experts(families, tmp_path):
    fam = families["llama"]
    cfg = _config("llama")
    cfg.intermediate_size = 80
    other = _family(str(tmp_path / "other"), "llama", n_experts=0, seed=5, config=cfg)
    text = _recipe(fam, "hidden").replace(fam["ft2"], other["base"])
    path = tmp_path / "bad.yml"
    path.write_text(text)
    out = tmp_path / "bad"
    result = CliRunner().invoke(main, ["moe", str(path), str(out)])
    assert result.exit_code == 1
    assert "every expert must have the base's shapes" in result.output and "error:" in result.output
    assert not out.exists()
    text = _recipe(fam, "hidden").replace(fam["ft2"], families["qwen2"]["ft1"])
    path.write_text(text)
    result = CliRunner().invoke(main, ["moe", str(path), str(out)])
    assert result.exit_code == 1 and "is a qwen2 model, the base is llama" in result.output
    assert not out.exists()


def test_recipe_errors_before_any_work(families, tmp_path):
    fam = families["llama"]
    cases = [
        (_recipe(fam).replace("gate_mode: hidden", "gate_mode: hiden"), "gate_mode: must be one of"),
        (_recipe(fam).replace("experts_per_token: 1", "experts_per_token: 4"), "more than the 3 experts"),
        (_recipe(fam, experts=[dict(positive_prompts=["cat"])] * 3), "the same positive and negative prompts"),
        (_recipe(fam, shared=True).replace(fam["base"], families["llama"]["base"]) + "architecture: mixtral\n",
         "Mixtral has no shared experts"),
    ]
    for text, message in cases:
        path = tmp_path / "r.yml"
        path.write_text(text)
        result = CliRunner().invoke(main, ["moe", str(path), str(tmp_path / "never")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_layout_holds_the_same_experts(families, tmp_path, kind):
    """--expert-layout packed: transformers 5's fused tensors, each expert's projections in
    place (noise and scale as in the per-expert layout), chunked within a small budget
    across expert boundaries; the model loads and gives the per-expert model's logits."""
    import transformers

    fam = families[kind]
    experts = [dict(e) for e in EXPERTS]
    experts[0]["noise_scale"] = 0.01
    experts[1]["residual_scale"] = 0.5
    text = _recipe(fam, "router_input", shared=kind == "qwen2", experts=experts)
    per_expert, packed = str(tmp_path / "per"), str(tmp_path / "packed")
    _run_moe(tmp_path, text, per_expert, "-q")
    _run_moe(tmp_path, text, packed, "-q", "--expert-layout", "packed", "--chunk-size", "20K")
    n = 2 if kind == "qwen2" else 3
    name = "block_sparse_moe.experts.{e}.{p}.weight" if kind == "llama" else "mlp.experts.{e}.{p}.weight"
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"} if kind == "llama" else \
        {p: p for p in ("gate_proj", "up_proj", "down_proj")}
    for layer in range(4):
        gate_up = _tensor(packed, f"model.layers.{layer}.mlp.experts.gate_up_proj")
        down = _tensor(packed, f"model.layers.{layer}.mlp.experts.down_proj")
        assert gate_up.shape == (n, 2 * 192, 128) and down.shape == (n, 128, 192)
        for e in range(n):
            def one(p):
                return _tensor(per_expert, f"model.layers.{layer}." + name.format(e=e, p=names[p]))

            assert torch.equal(gate_up[e], torch.cat([one("gate_proj"), one("up_proj")]))
            assert torch.equal(down[e], one("down_proj"))
        router = "block_sparse_moe.gate.weight" if kind == "llama" else "mlp.gate.weight"
        assert torch.equal(_tensor(packed, f"model.layers.{layer}.mlp.gate.weight"),
                           _tensor(per_expert, f"model.layers.{layer}.{router}"))
    a = transformers.AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    b = transformers.AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
    ids = torch.tensor([[1, 340, 341, 360]])
    torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_resumed_moe_writes_its_report_and_bytes(families, tmp_path, monkeypatch):
    """A MoE interrupted (Ctrl-C) once most units are written resumes to the same bytes,
    and writes its routing report again."""
    from dmerge.io import journal

    fam = families["llama"]
    text = _recipe(fam, "hidden")
    whole = str(tmp_path / "whole")
    _run_moe(tmp_path, text, whole, "-q")
    path = tmp_path / "r.yml"
    path.write_text(text)
    out = str(tmp_path / "out")
    record, count = journal.Journal.record, [0]

    def interrupting(self, unit):
        record(self, unit)
        count[0] += 1
        if count[0] == 60:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(journal.Journal, "record", interrupting)
        result = CliRunner().invoke(main, ["moe", str(path), out, "-q"])
    assert result.exit_code == 130, result.output
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    result = CliRunner().invoke(main, ["moe", str(path), out, "-q", "--resume"])
    assert result.exit_code == 0, result.output
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == \
        open(os.path.join(whole, "model.safetensors"), "rb").read()
    assert json.load(open(os.path.join(out, "routing_report.json"))) == \
        json.load(open(os.path.join(whole, "routing_report.json")))


def test_experts_behind_urls(families, tmp_path):
    """Base and experts behind fsspec URLs: read by byte range (never a whole file), the
    same bytes as from local folders."""
    from test_storage_cluster import CountingMemoryFS, _upload

    fam = families["llama"]
    urls = {k: _upload(v, f"/moe-bucket/{k}") for k, v in fam.items()}
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    _run_moe(tmp_path, _recipe(fam, "hidden"), local, "-q")
    CountingMemoryFS.whole_file_reads.clear()
    _run_moe(tmp_path, _recipe(urls, "hidden"), remote, "-q")
    assert CountingMemoryFS.whole_file_reads == []
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == \
        open(os.path.join(remote, "model.safetensors"), "rb").read()


def test_layer_products_split_into_block_tasks(families, tmp_path, monkeypatch):
    """With weights of several blocks, a layer task hands its blocks to the cluster as
    tasks of their own; the routers' bytes are the same as with whole weights."""
    import dmerge.moe.hidden as hidden

    fam = families["qwen2"]
    text = _recipe(fam, "router_input", shared=True)
    whole = str(tmp_path / "whole")
    _run_moe(tmp_path, text, whole, "-q")
    log = str(tmp_path / "blocks.log")
    real = hidden.block_task

    def counting(*args, **kwargs):
        # Dask serializes the function (a closure: by value), so count in a file
        with open(log, "a") as f:
            f.write(f"{args[1]} {args[2]}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(hidden, "MATMUL_ROWS", 32)  # blocks of 32 rows in these tiny layers
    monkeypatch.setattr(hidden, "block_task", counting)
    split = str(tmp_path / "split")
    _run_moe(tmp_path, text, split, "-q", "--chunk-size", "1K", "--workers", "2", "--threads-per-worker", "1")
    seen = open(log).read().splitlines()
    assert len(seen) > 4 * 7  # every linear layer of every decoder layer, in several blocks
    for layer in range(4):
        for name in ("mlp.gate.weight", "mlp.shared_expert_gate.weight"):
            a = _tensor(whole, f"model.layers.{layer}.{name}").float()
            b = _tensor(split, f"model.layers.{layer}.{name}").float()
            assert bool((torch.nn.functional.cosine_similarity(a, b, dim=-1) > 0.9999).all())


def test_plan_for_a_405b_moe_stays_within_the_budget(tmp_path):
    """A 2-expert MoE of Llama-3.1-405B-shaped models (sparse files, headers only): every
    task, the router pass's included, plans within the chunk budget (plus the prompts'
    activations), the packed [experts, 2I, H] tensors too (one expert's is 3.5 GB)."""
    from dmerge.moe.plan import build_moe_plan
    from dmerge.moe.recipe import load_moe_recipe
    from dmerge.toymodels import LLAMA_405B, write_sparse_model, write_wordlevel_tokenizer

    parents = [write_sparse_model(str(tmp_path / f"p{i}"), LLAMA_405B) for i in range(3)]
    write_wordlevel_tokenizer(parents[0], [f"w{i}" for i in range(100)])
    text = f"""
base_model: {parents[0]}
expert_layout: packed
experts:
  - source_model: {parents[1]}
    positive_prompts: ["w1 w2 w3"]
  - source_model: {parents[2]}
    positive_prompts: ["w4 w5 w6"]
"""
    budget = 128 << 20
    plan = build_moe_plan(load_moe_recipe(text, is_text=True), chunk_bytes=budget)
    rp = plan.computations[0]
    assert rp.n_layers == 126 and max(rp.layer_bytes) > 6e9  # one layer is 6.4 GB
    packed = [t for t in plan.tensors if t.pieces is not None]
    assert len(packed) == 2 * 126 and packed[0].shape == (2, 2 * 53248, 16384)
    assert max(t.task_bytes for t in plan.tensors) <= budget
    assert rp.peak_task_bytes <= budget + 64 * rp.activation_bytes
    assert plan.peak_task_bytes <= 1.1 * budget


@pytest.mark.parametrize("cluster", [(), ("--workers", "2", "--threads-per-worker", "1")], ids=["threads", "cluster"])
def test_moe_into_a_bucket(families, tmp_path, cluster):
    """Written to S3 (moto's server on 127.0.0.1) as multipart uploads, routers and all:
    the same bytes and routing report as in a local folder."""
    import fsspec

    from s3stand import S3Stand

    fam = families["llama"]
    text = _recipe(fam, "hidden")
    local = str(tmp_path / "local")
    _run_moe(tmp_path, text, local, "-q")
    stand = S3Stand()
    try:
        stand.boto().create_bucket(Bucket="moe")
        prefix = f"moe/built-{len(cluster)}"  # moto's state is the process's: one prefix per case
        options = json.dumps({"s3": stand.options()})
        _run_moe(tmp_path, text, f"s3://{prefix}", "-q", "--storage-options", options, *cluster)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **stand.options())
        for name in ("model.safetensors", "config.json", "routing_report.json"):
            assert fs.cat_file(f"{prefix}/{name}") == open(os.path.join(local, name), "rb").read(), name
        assert fs.exists(f"{prefix}/model.safetensors.index.json")
        assert stand.boto().list_multipart_uploads(Bucket="moe").get("Uploads", []) == []
    finally:
        stand.stop()


def test_moe_in_many_upload_parts_waves_hold_whole_groups(families, tmp_path):
    """Cut into many small upload parts, a MoE's part graph runs wave by wave (each wave
    holding every task its tasks need: routers travel with their computation) and
    assembles the local model's bytes."""
    import dask

    from dmerge.graph import build_part_graph, part_groups, waves
    from dmerge.io.object_output import plan_parts
    from dmerge.moe.plan import build_moe_plan
    from dmerge.moe.recipe import load_moe_recipe
    from dmerge.threaded import _dependencies

    fam = families["llama"]
    text = _recipe(fam, "hidden")
    local = str(tmp_path / "local")
    _run_moe(tmp_path, text, local, "-q")
    plan = build_moe_plan(load_moe_recipe(text, is_text=True), chunk_bytes=8 << 10)
    parts = plan_parts(plan, min_part=16 << 10)
    assert len(parts) > 10 and any(plan.tensors[t].computed is not None for p in parts for t, _ in p.members)
    uploaded: dict[tuple[int, int], bytes] = {}

    class Collect:
        def __init__(self, shard):
            self.shard = shard

        def upload(self, number, payload):
            uploaded[(self.shard, number)] = bytes(payload)

    dsk, keys = build_part_graph(plan, parts, [Collect(i) for i in range(len(plan.shards))], "r")
    cut = waves(dsk, keys, 40, group_of=part_groups(parts, plan))
    assert len(cut) > 1
    for wave_dsk, wave_keys, _ in cut:
        for task in wave_dsk.values():
            assert all(dep in wave_dsk for dep in _dependencies(task, dsk))
        dask.get(wave_dsk, wave_keys)
    shard = b"".join(uploaded[(0, p.number)] for p in parts if p.shard == 0)
    assert shard == open(os.path.join(local, "model.safetensors"), "rb").read()
