"""Frankenmerges: slices with layer remapping, depth up-scaling, passthrough with scale,
mixed merged and stacked slices, tied embeddings, per-layer config lists, model card;
differential tests against mergekit on the same recipes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import compare_with_mergekit, load_folder, run_merge, shard_bytes, write_recipe
from dmerge.toymodels import LlamaShape, random_weights, write_model

SHAPE = LlamaShape(hidden=32, layers=12, intermediate=64, heads=4, kv_heads=2, vocab=64)
LAYER_RE = ".layers."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    """Two unrelated 12-layer Llamas (A, B), a tied one (T), B in two shards."""
    root = tmp_path_factory.mktemp("zoo")
    out = {
        "A": write_model(str(root / "A"), random_weights(SHAPE, 1), SHAPE.config("bfloat16")),
        "B": write_model(str(root / "B"), random_weights(SHAPE, 2), SHAPE.config("bfloat16"), shard_bytes=100_000),
    }
    tied = LlamaShape(**{**SHAPE.__dict__, "tie_embeddings": True})
    out["T"] = write_model(str(root / "T"), random_weights(tied, 3), tied.config("bfloat16"))
    return out


def layer_of(name: str) -> int | None:
    return int(name.split(LAYER_RE)[1].split(".")[0]) if LAYER_RE in name else None


def renamed(name: str, index: int) -> str:
    head, rest = name.split(LAYER_RE)
    return f"{head}{LAYER_RE}{index}.{rest.split('.', 1)[1]}"


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_stack(out: dict, parents: dict, stack: list[tuple[str, int, int]], pre: str, post: str) -> None:
    """Every output layer's tensors are the source layer's bytes; pre from the first
    slice's model, post from the last's; nothing else in the output."""
    expected = {}
    k = 0
    for model, a, b in stack:
        for i in range(a, b):
            for name, t in parents[model].items():
                if layer_of(name) == i:
                    expected[renamed(name, k)] = t
            k += 1
    for name, t in parents[pre].items():
        if layer_of(name) is None and "embed" in name:
            expected[name] = t
    for name, t in parents[post].items():
        if layer_of(name) is None and "embed" not in name:
            expected[name] = t
    assert out.keys() == expected.keys(), set(out) ^ set(expected)
    for name in out:
        assert same_bytes(out[name], expected[name]), name


def loads_in_transformers(folder: str, n_layers: int) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == n_layers == len(model.model.layers)
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, SHAPE.vocab) and bool(torch.isfinite(logits).all())


FRANKEN = """
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [0, 8]
  - sources:
      - model: {B}
        layer_range: [4, 12]
dtype: bfloat16
"""

DUS = """
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [0, 8]
  - sources:
      - model: {A}
        layer_range: [4, 12]
dtype: bfloat16
"""


@pytest.mark.parametrize("kind", ["franken", "dus"])
def test_stacked_slices(zoo, tmp_path, kind):
    from mergekit_oracle import run_mergekit

    text = (FRANKEN if kind == "franken" else DUS).format(**zoo)
    recipe = write_recipe(tmp_path / "r.yml", text)
    out = str(tmp_path / "out")
    run_merge(recipe, out, "--out-shard-size", "150K")
    parents = {k: load_folder(v) for k, v in zoo.items()}
    last = "B" if kind == "franken" else "A"
    stack = [("A", 0, 8), (last, 4, 12)]
    ours = load_folder(out)
    assert_stack(ours, parents, stack, pre="A", post=last)

    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_hidden_layers"] == 16 and cfg["tie_word_embeddings"] is False
    loads_in_transformers(out, 16)

    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nbase_model:\n") and "- merge\n- dmerge\n" in card
    assert f"| 8-15 | {zoo[last]} layers 4-11 |" in card and text.strip() in card

    # mergekit, same recipe: byte-identical tensors
    theirs = load_folder(run_mergekit(text, str(tmp_path / "mk"), dtype="bfloat16", out_dtype=None))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert same_bytes(ours[name], theirs[name]), name


SCALED = """
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [2, 7]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: [0.5, 1.5]
            - value: 1.0
  - sources:
      - model: {B}
        layer_range: [0, 3]
        parameters:
          scale:
            - filter: mlp
              value: 2.0
  - sources:
      - model: {A}
        layer_range: [11, 12]
dtype: bfloat16
"""


def test_passthrough_scale_with_filters_matches_mergekit_bytes(zoo, tmp_path):
    from mergekit_oracle import run_mergekit

    text = SCALED.format(**zoo)
    recipe = write_recipe(tmp_path / "r.yml", text)
    run_merge(recipe, str(tmp_path / "out"), "--chunk-size", "2K")
    ours = load_folder(str(tmp_path / "out"))
    a, b = load_folder(zoo["A"]), load_folder(zoo["B"])
    # layer 1 of the output is A's layer 3 (t = 1/4): o_proj zeroed, down_proj * 0.75
    assert torch.equal(ours["model.layers.1.self_attn.o_proj.weight"].float(), torch.zeros(32, 32))
    assert torch.equal(ours["model.layers.1.mlp.down_proj.weight"], (a["model.layers.3.mlp.down_proj.weight"].double() * 0.75).bfloat16())
    assert same_bytes(ours["model.layers.1.self_attn.q_proj.weight"], a["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.layers.6.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"] * 2)
    assert same_bytes(ours["model.layers.8.self_attn.q_proj.weight"], a["model.layers.11.self_attn.q_proj.weight"])
    assert len({layer_of(n) for n in ours if layer_of(n) is not None}) == 9
    theirs = load_folder(run_mergekit(text, str(tmp_path / "mk"), dtype="bfloat16", out_dtype=None))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert same_bytes(ours[name], theirs[name]), name


MIXED_LINEAR = """
merge_method: linear
parameters:
  weight: 0.5
slices:
  - sources:
      - model: {A}
        layer_range: [0, 4]
      - model: {B}
        layer_range: [0, 4]
        parameters:
          weight: [0.2, 0.8]
  - sources:
      - model: {B}
        layer_range: [4, 10]
  - sources:
      - model: {A}
        layer_range: [10, 12]
      - model: {B}
        layer_range: [10, 12]
dtype: bfloat16
"""


def test_mixed_merged_and_single_source_slices_match_mergekit(zoo, tmp_path):
    """linear over two-source slices and a one-source slice in between (w*x/w = x)."""
    from mergekit_oracle import run_mergekit

    text = MIXED_LINEAR.format(**zoo)
    run_merge(write_recipe(tmp_path / "r.yml", text), str(tmp_path / "out"))
    ours = load_folder(str(tmp_path / "out"))
    a, b = load_folder(zoo["A"]), load_folder(zoo["B"])
    for k in range(4, 10):  # the single-source slice: B's layers, unchanged
        for name in ours:
            if layer_of(name) == k:
                assert same_bytes(ours[name], b[renamed(name, k)]), name
    theirs = load_folder(run_mergekit(text, str(tmp_path / "mk")))

    def reference(name):
        k = layer_of(name)
        if k is None:  # pre / post: t = 0, weights 0.5 and 0.2
            return (0.5 * a[name].double() + 0.2 * b[name].double()) / 0.7
        if 4 <= k < 10:
            return b[name].double()
        t = k / 3 if k < 4 else (k - 10)
        wb = 0.2 + 0.6 * t
        return (0.5 * a[name].double() + wb * b[name].double()) / (0.5 + wb)

    compare_with_mergekit(ours, theirs, reference)
    loads_in_transformers(str(tmp_path / "out"), 12)


def test_single_source_slice_copied_for_base_methods(zoo, tmp_path):
    """task_arithmetic with a B-only slice: copied (mergekit refuses a slice without its base)."""
    text = f"""
merge_method: task_arithmetic
base_model: {zoo['A']}
slices:
  - sources:
      - model: {zoo['A']}
        layer_range: [0, 6]
      - model: {zoo['B']}
        layer_range: [0, 6]
        parameters: {{weight: 0.5}}
  - sources:
      - model: {zoo['B']}
        layer_range: [6, 12]
        parameters: {{scale: 0.5}}
dtype: bfloat16
"""
    run_merge(write_recipe(tmp_path / "r.yml", text), str(tmp_path / "out"))
    ours = load_folder(str(tmp_path / "out"))
    a, b = load_folder(zoo["A"]), load_folder(zoo["B"])
    name = "model.layers.2.mlp.up_proj.weight"
    expected = (a[name].double() + 0.5 * (b[name].double() - a[name].double())).bfloat16()
    assert (ours[name].double() - expected.double()).abs().max() <= 2 ** -8 * expected.double().abs().max()
    assert torch.equal(ours["model.layers.7.mlp.up_proj.weight"], b["model.layers.7.mlp.up_proj.weight"] * 0.5)
    assert torch.equal(ours["lm_head.weight"], b["lm_head.weight"] * 0.5)  # post: last slice, copied with scale


def test_tied_model_frankenmerge_writes_no_head(zoo, tmp_path):
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {zoo['T']}, layer_range: [0, 9]}}]
  - sources: [{{model: {zoo['T']}, layer_range: [3, 12]}}]
"""
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out, "--no-write-model-card")
    assert not os.path.exists(os.path.join(out, "README.md"))
    ours = load_folder(out)
    assert "lm_head.weight" not in ours and "model.embed_tokens.weight" in ours
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 18
    loads_in_transformers(out, 18)


def test_tied_and_untied_parents(zoo, tmp_path):
    """A tied parent's embedding stands in for its missing lm_head (as in mergekit); the
    output has an lm_head, so its config is untied."""
    from mergekit_oracle import run_mergekit

    text = f"""
merge_method: linear
base_model: {zoo['T']}
models:
  - model: {zoo['T']}
    parameters: {{weight: 0.5}}
  - model: {zoo['A']}
    parameters: {{weight: 0.5}}
dtype: bfloat16
"""
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out)
    ours = load_folder(out)
    t, a = load_folder(zoo["T"]), load_folder(zoo["A"])
    expected = ((t["model.embed_tokens.weight"].double() + a["lm_head.weight"].double()) / 2).bfloat16()
    assert torch.equal(ours["lm_head.weight"], expected)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    loads_in_transformers(out, 12)
    theirs = load_folder(run_mergekit(text, str(tmp_path / "mk")))

    def reference(name):
        x = t.get(name, t["model.embed_tokens.weight"])
        return (x.double() + a[name].double()) / 2

    compare_with_mergekit(ours, theirs, reference)


def test_per_layer_config_lists_follow_layers(tmp_path):
    """A Qwen3 (transformers-built) frankenmerge: layer_types remapped with the layers."""
    transformers = pytest.importorskip("transformers")
    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
             "full_attention"]
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128, use_sliding_window=True, sliding_window=8,
                                   layer_types=types, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "q3"))
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {tmp_path / 'q3'}, layer_range: [0, 4]}}]
  - sources: [{{model: {tmp_path / 'q3'}, layer_range: [1, 2]}}]
  - sources: [{{model: {tmp_path / 'q3'}, layer_range: [4, 6]}}]
"""
    out = str(tmp_path / "out")
    run_merge(write_recipe(tmp_path / "r.yml", text), out)
    got = json.load(open(os.path.join(out, "config.json")))
    assert got["num_hidden_layers"] == 7
    assert got["layer_types"] == types[0:4] + types[1:2] + types[4:6]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == got["layer_types"]
    assert bool(torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all())


def test_scaled_frankenmerge_independent_of_chunking(zoo, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", SCALED.format(**zoo))
    run_merge(recipe, str(tmp_path / "one"), "--out-shard-size", "100K")
    run_merge(recipe, str(tmp_path / "two"), "--out-shard-size", "100K", "--chunk-size", "3K", "--workers", "2",
              "--threads-per-worker", "1")
    a, b = shard_bytes(str(tmp_path / "one")), shard_bytes(str(tmp_path / "two"))
    assert len(a) > 1 and a == b


def test_slice_errors(zoo, tmp_path):
    from dmerge.errors import RecipeError
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    bad = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {zoo['A']}, layer_range: [4, 13]}}]\n"
    with pytest.raises(RecipeError, match=r"slices\[0\]: layer_range \[4, 13\].*has 12 layers"):
        build_plan(load_recipe(write_recipe(tmp_path / "r.yml", bad)))
    two = (f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {zoo['A']}, layer_range: [0, 2]}}\n"
           f"      - {{model: {zoo['B']}, layer_range: [0, 2]}}\n")
    with pytest.raises(RecipeError, match="exactly one source per slice"):
        load_recipe(write_recipe(tmp_path / "r2.yml", two))


def test_plan_prints_layer_origins(zoo, tmp_path):
    from click.testing import CliRunner

    from dmerge.cli import main

    recipe = write_recipe(tmp_path / "r.yml", MIXED_LINEAR.format(**zoo))
    result = CliRunner().invoke(main, ["plan", recipe, "--tensors"])
    assert result.exit_code == 0, result.output
    assert "output layers:     12" in result.output
    assert f"0-3 <- linear of {zoo['A']} layers 0-3 + {zoo['B']} layers 0-3" in result.output
    assert f"4-9 <- {zoo['B']} layers 4-9" in result.output
    assert f"model.layers.5.mlp.up_proj.weight [64, 32] BF16 linear chunks=1 <- {zoo['B']}:model.layers.5.mlp.up_proj.weight" in result.output
