"""Every example recipe in configs/ runs: its Hub model names are rewritten to tiny local
models of the same depth (32 layers, like Mistral-7B), the merge runs through the CLI,
and transformers loads the result. Recipes whose merge method is not registered yet
are skipped with the reason."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import yaml

from conftest import load_folder, run_merge
from dmerge.toymodels import LlamaShape, fine_tune_of, random_weights, write_model, write_wordlevel_tokenizer

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yml")))
SHAPE = LlamaShape(hidden=16, layers=32, intermediate=32, heads=2, kv_heads=1, vocab=64)
WORDS = [f"w{i}" for i in range(SHAPE.vocab - 3)]

# Hub names used in configs/ -> tiny stand-ins
TINY = {
    "mistralai/Mistral-7B-v0.1": "base",
    "OpenPipe/mistral-ft-optimized-1218": "ft1",
    "mlabonne/NeuralHermes-2.5-Mistral-7B": "ft2",
    "mistralai/Mistral-7B-Instruct-v0.2": "ft3",
    "teknium/OpenHermes-2.5-Mistral-7B": "chatml",
}

# Hub names in the FrankenMoE examples (merge_method: moe) -> (family, member) of the
# tiny families of tests/test_moe.py (Llama for Mixtral, Qwen2, Qwen3)
MOE_TINY = {
    "mistralai/Mistral-7B-v0.1": ("llama", "base"),
    "OpenPipe/mistral-ft-optimized-1218": ("llama", "ft1"),
    "mlabonne/NeuralHermes-2.5-Mistral-7B": ("llama", "ft2"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("llama", "ft3"),
    "Qwen/Qwen2.5-7B": ("qwen2", "base"),
    "Qwen/Qwen2.5-Math-7B": ("qwen2", "ft1"),
    "Qwen/Qwen2.5-Coder-7B": ("qwen2", "ft2"),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", "ft3"),
    "Qwen/Qwen3-4B-Base": ("qwen3", "base"),
    "Qwen/Qwen3-4B": ("qwen3", "ft1"),
    "Qwen/Qwen3-4B-Instruct-2507": ("qwen3", "ft2"),
    "Qwen/Qwen3-4B-Thinking-2507": ("qwen3", "ft3"),
}
MOE_ARCH = {"llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A base, three fine-tunes of it, and a fine-tune with two ChatML tokens added."""
    root = tmp_path_factory.mktemp("configs")
    base = random_weights(SHAPE, 7)
    cfg = SHAPE.config("bfloat16")
    out = {"base": write_model(str(root / "base"), base, cfg)}
    for i in (1, 2, 3):
        out[f"ft{i}"] = write_model(str(root / f"ft{i}"), fine_tune_of(base, 100 + i), cfg)
    chat = fine_tune_of(base, 200)
    g = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = (0.02 * torch.randn((2, SHAPE.hidden), generator=g)).to(chat[name].dtype)
        chat[name] = torch.cat([chat[name], extra])
    out["chatml"] = write_model(str(root / "chatml"), chat, dict(cfg, vocab_size=SHAPE.vocab + 2))
    for name, folder in out.items():
        write_wordlevel_tokenizer(folder, WORDS, special=["<|im_start|>", "<|im_end|>"] if name == "chatml" else [])
    return out


def _rewrite(node, tiny: dict[str, str], seen: set):
    """Replace every Hub model name in a parsed recipe by its tiny stand-in."""
    if isinstance(node, dict):
        return {k: _rewrite(v, tiny, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, tiny, seen) for v in node]
    if isinstance(node, str) and node in TINY:
        seen.add(node)
        return tiny[TINY[node]]
    return node


def _expected_layers(doc: dict) -> int:
    if doc.get("slices"):
        return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in doc["slices"])
    return SHAPE.layers


def _model_refs(node, key=None):
    """Every model reference in a parsed recipe (values of model / base_model / sources)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _model_refs(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _model_refs(v, key)
    elif isinstance(node, str) and key in ("model", "base_model", "tokenizer_source", "source", "source_model"):
        if node not in ("base", "union"):
            yield node


def test_every_config_is_tested():
    """Each example explains itself and names only models this test can stand in for."""
    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        doc = yaml.safe_load(open(path))
        assert open(path).read().lstrip().startswith("#"), f"{path}: needs a comment saying what it does"
        assert "merge_method" in doc
        unknown = set(_model_refs(doc)) - set(MOE_TINY if doc["merge_method"] == "moe" else TINY)
        assert not unknown, f"{path}: add tiny stand-ins for {sorted(unknown)}"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_runs_on_tiny_models(path, tiny, tmp_path):
    from dmerge.errors import RecipeError
    from dmerge.methods import get_method

    doc = yaml.safe_load(open(path))
    if doc["merge_method"] == "moe":
        pytest.skip("a FrankenMoE recipe: test_moe_config_runs_on_tiny_models runs it")
    try:
        get_method(doc["merge_method"])
    except RecipeError:
        pytest.skip(f"merge method {doc['merge_method']!r} is not registered yet (being implemented in parallel)")
    seen: set = set()
    local = _rewrite(doc, tiny, seen)
    assert seen, "the config names no known model"
    recipe = tmp_path / os.path.basename(path)
    recipe.write_text(yaml.safe_dump(local, sort_keys=False))
    out = str(tmp_path / "out")
    run_merge(str(recipe), out)

    cfg = json.load(open(os.path.join(out, "config.json")))
    n_layers = _expected_layers(doc)
    assert cfg["num_hidden_layers"] == n_layers
    tensors = load_folder(out)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    assert cfg["vocab_size"] == rows
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    if "tokenizer" in doc:
        assert len(tok) == SHAPE.vocab + 2 and rows == 128  # union of 64 + 2 tokens, padded to 64
        assert "<|im_start|>" in (tok.chat_template or "")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == n_layers
    logits = model(torch.tensor([tok("w1 w2 w3").input_ids])).logits
    assert logits.shape[-1] == rows and bool(torch.isfinite(logits).all())
    card = open(os.path.join(out, "README.md")).read()
    assert f"merge_method: {doc['merge_method']}" in card


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Tiny Llama, Qwen2 and Qwen3 families (base + 3 fine-tunes each)."""
    from test_moe import _family

    root = str(tmp_path_factory.mktemp("moe-configs"))
    return {kind: _family(root, kind) for kind in ("llama", "qwen2", "qwen3")}


MOE_CONFIGS = [p for p in CONFIGS if yaml.safe_load(open(p)).get("merge_method") == "moe"]


@pytest.mark.parametrize("path", MOE_CONFIGS, ids=[os.path.basename(p) for p in MOE_CONFIGS])
def test_moe_config_runs_on_tiny_models(path, tiny_moe, tmp_path):
    """A FrankenMoE example runs through `dmerge run` on tiny stand-ins of its family,
    writes its routing report, and transformers loads the MoE it builds."""
    doc = yaml.safe_load(open(path))
    kinds = set()

    def rewrite(node):
        if isinstance(node, dict):
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if isinstance(node, str) and node in MOE_TINY:
            kind, member = MOE_TINY[node]
            kinds.add(kind)
            return tiny_moe[kind][member]
        return node

    local = rewrite(doc)
    assert len(kinds) == 1, kinds
    kind = kinds.pop()
    recipe = tmp_path / os.path.basename(path)
    recipe.write_text(yaml.safe_dump(local, sort_keys=False))
    out = str(tmp_path / "out")
    run_merge(str(recipe), out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == [MOE_ARCH[kind]]
    report = json.load(open(os.path.join(out, "routing_report.json")))
    assert report["gate_mode"] == doc["gate_mode"] and len(report["experts"]) == len(doc["experts"])
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == MOE_ARCH[kind]
    logits = model(torch.tensor([[1, 340, 341]])).logits
    assert bool(torch.isfinite(logits).all())
