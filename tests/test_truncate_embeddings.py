"""--unsafe-truncate-embeddings: parents with different vocabulary sizes and no tokenizer
merge (mergekit 0.1.5's option of that name) by keeping the rows they all have."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from conftest import TINY, bf16_ulp, load_folder, run_merge, write_recipe
from dmerge.errors import InputModelError
from dmerge.plan import build_plan
from dmerge.recipe import load_recipe
from dmerge.toymodels import fine_tune_of, random_weights, write_model

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
EXTRA_ROWS = 8


@pytest.fixture(scope="module")
def wider(family, tmp_path_factory) -> str:
    """A fine-tune of the family's base with EXTRA_ROWS more vocabulary rows (added tokens)."""
    from dataclasses import replace

    shape = replace(TINY, vocab=TINY.vocab + EXTRA_ROWS)
    base = load_folder(family["base"])
    weights = fine_tune_of(base, seed=77)
    extra = random_weights(shape, seed=78)
    for name in (EMB, HEAD):
        weights[name] = torch.cat([weights[name], extra[name][TINY.vocab:]])
    return write_model(str(tmp_path_factory.mktemp("wider") / "wide"), weights, shape.config("bfloat16"))


def _recipe_text(family, wider) -> str:
    return f"""
merge_method: linear
models:
  - model: {wider}
    parameters: {{weight: 0.6}}
  - model: {family['ft1']}
    parameters: {{weight: 0.4}}
dtype: bfloat16
"""


def test_without_the_option_vocabularies_must_match(family, wider, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", _recipe_text(family, wider)))
    with pytest.raises(InputModelError, match="shape mismatch.*tokenizer_source"):
        build_plan(recipe)


def test_plan_keeps_the_common_rows_and_warns(family, wider, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", _recipe_text(family, wider)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = build_plan(recipe, unsafe_truncate_embeddings=True)
    by_name = {t.name: t for t in plan.tensors}
    for name in (EMB, HEAD):
        assert by_name[name].shape == (TINY.vocab, TINY.hidden)
        # only the kept rows are read, from both parents
        assert by_name[name].bytes_read == 2 * TINY.vocab * TINY.hidden * 2
    assert plan.out_config["vocab_size"] == TINY.vocab
    texts = [str(w.message) for w in caught if "unsafe-truncate-embeddings" in str(w.message)]
    assert len(texts) == 2 and all("\n" not in t and f"first {TINY.vocab} rows" in t for t in texts)


def test_merge_equals_the_merge_of_the_prefixes(family, wider, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", _recipe_text(family, wider))
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="unsafe-truncate-embeddings"):
        run_merge(recipe, out, "--unsafe-truncate-embeddings", "--chunk-size", "4K")
    merged = load_folder(out)
    a, b = load_folder(wider), load_folder(family["ft1"])
    for name in (EMB, HEAD):
        expected = 0.6 * a[name][:TINY.vocab].double() + 0.4 * b[name].double()
        assert merged[name].shape == expected.shape
        # float64 then one rounding: at most half a bf16 step off (plus float64 slack)
        assert bool(((merged[name].double() - expected).abs() <= 0.5001 * bf16_ulp(expected) + 1e-15).all())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == TINY.vocab


def test_agrees_with_mergekit(family, wider, tmp_path):
    from mergekit_oracle import run_mergekit

    text = _recipe_text(family, wider)
    with pytest.warns(UserWarning, match="unsafe-truncate-embeddings"):
        run_merge(write_recipe(tmp_path / "r.yml", text), str(tmp_path / "ours"), "--unsafe-truncate-embeddings")
    theirs = load_folder(run_mergekit(text, str(tmp_path / "theirs"), dtype="float32", out_dtype="bfloat16",
                                      unsafe_truncate_embeddings=True))
    ours = load_folder(str(tmp_path / "ours"))
    for name in (EMB, HEAD):
        assert ours[name].shape == theirs[name].shape == (TINY.vocab, TINY.hidden)
        assert (ours[name].double() - theirs[name].double()).abs().max() <= 2 ** -8 * theirs[name].double().abs().max()
