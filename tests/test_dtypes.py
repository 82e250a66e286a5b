"""Output dtypes: out_dtype, else dtype, else the parents' dtypes promoted (as mergekit)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, compare_with_mergekit, load_folder, run_merge, write_recipe
from dmerge.plan import build_plan
from dmerge.recipe import load_recipe
from dmerge.toymodels import fine_tune_of, random_weights, write_model


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, str]:
    """The same tiny model stored in bf16 and, fine-tuned, in float32."""
    root = tmp_path_factory.mktemp("mixed")
    bf16 = random_weights(TINY, 7, "bfloat16")
    fp32 = {k: v.float() for k, v in fine_tune_of(bf16, 8).items()}
    return {
        "bf16": write_model(str(root / "bf16"), bf16, TINY.config("bfloat16")),
        "fp32": write_model(str(root / "fp32"), fp32, TINY.config("float32")),
    }


def _linear(first: str, second: str, extra: str = "") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {second}\n    parameters: {{weight: 0.4}}\n{extra}")


def _planned(text: str):
    plan = build_plan(load_recipe(text, is_text=True))
    return {t.dtype for t in plan.tensors}, plan.out_config["torch_dtype"]


@pytest.mark.parametrize("order", [("bf16", "fp32"), ("fp32", "bf16")])
def test_mixed_parents_without_dtype_promote_whatever_the_order(mixed, order):
    assert _planned(_linear(mixed[order[0]], mixed[order[1]])) == ({"F32"}, "float32")


@pytest.mark.parametrize("extra, expect", [
    ("dtype: bfloat16\n", ({"BF16"}, "bfloat16")),
    ("out_dtype: float16\n", ({"F16"}, "float16")),
    ("dtype: float32\nout_dtype: bfloat16\n", ({"BF16"}, "bfloat16")),
])
def test_dtype_and_out_dtype_decide_when_given(mixed, extra, expect):
    assert _planned(_linear(mixed["bf16"], mixed["fp32"], extra)) == expect
    assert _planned(_linear(mixed["fp32"], mixed["bf16"], extra)) == expect


def test_bf16_and_fp16_promote_to_float32(mixed, tmp_path):
    fp16 = {k: v.half() for k, v in load_folder(mixed["fp32"]).items()}
    folder = write_model(str(tmp_path / "fp16"), fp16, TINY.config("float16"))
    assert _planned(_linear(mixed["bf16"], folder)) == ({"F32"}, "float32")


def test_single_parent_is_byte_copied_and_integer_buffers_kept(mixed, tmp_path):
    weights = load_folder(mixed["fp32"])
    weights["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    folder = write_model(str(tmp_path / "ints"), weights, TINY.config("float32"))
    text = f"merge_method: passthrough\nmodels:\n  - model: {folder}\n"
    plan = build_plan(load_recipe(text, is_text=True))
    assert all(t.copy_bytes for t in plan.tensors)
    run_merge(write_recipe(tmp_path / "copy.yml", text), str(tmp_path / "copy"))
    out = load_folder(str(tmp_path / "copy"))
    assert out.keys() == weights.keys()
    assert all(out[k].dtype == v.dtype and torch.equal(out[k], v) for k, v in weights.items())

    plan = build_plan(load_recipe(text + "out_dtype: bfloat16\n", is_text=True))
    dtypes = {t.name: t.dtype for t in plan.tensors}
    assert dtypes.pop("model.position_ids") == "I64" and set(dtypes.values()) == {"BF16"}


def test_mixed_parents_agree_with_mergekit(mixed, tmp_path):
    from mergekit_oracle import run_mergekit

    text = _linear(mixed["bf16"], mixed["fp32"])
    run_merge(write_recipe(tmp_path / "r.yml", text), str(tmp_path / "ours"))
    run_mergekit(text, str(tmp_path / "theirs"), dtype=None, out_dtype=None)
    ours, theirs = load_folder(str(tmp_path / "ours")), load_folder(str(tmp_path / "theirs"))
    assert {t.dtype for t in theirs.values()} == {torch.float32}  # mergekit promotes too
    parents = [load_folder(mixed["bf16"]), load_folder(mixed["fp32"])]
    compare_with_mergekit(ours, theirs, lambda name: 0.6 * parents[0][name].double() + 0.4 * parents[1][name].double())
    assert json.load(open(tmp_path / "ours" / "config.json"))["torch_dtype"] == "float32"
