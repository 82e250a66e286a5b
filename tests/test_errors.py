"""Bad input gives one clear line, a non-zero exit, and no output that looks complete."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import TINY, write_recipe
from dmerge.cli import main
from dmerge.toymodels import LlamaShape, random_weights, write_model


def _merge(tmp_path, other: str, method: str = "linear") -> tuple[int, str, str]:
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: {method}
base_model: {tmp_path / 'good'}
models:
  - model: {tmp_path / 'good'}
    parameters: {{weight: 0.5}}
  - model: {other}
    parameters: {{weight: 0.5}}
""")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", recipe, str(out), "--quiet"])
    return result.exit_code, result.output, str(out)


@pytest.fixture
def good(tmp_path):
    return write_model(str(tmp_path / "good"), random_weights(TINY, 1), TINY.config("bfloat16"), shard_bytes=60_000)


def _bad_copy(tmp_path, good) -> str:
    return shutil.copytree(good, str(tmp_path / "bad"))


def _assert_clean_failure(code, output, out, *needles):
    assert code == 1, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for n in needles:
        assert n in lines[0], output
    assert not os.path.exists(out), os.listdir(out)


def _first_shard(folder: str) -> str:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    return os.path.join(folder, wm["model.layers.1.mlp.up_proj.weight"])


def test_missing_tensor(tmp_path, good):
    bad = _bad_copy(tmp_path, good)
    idx_path = os.path.join(bad, "model.safetensors.index.json")
    idx = json.load(open(idx_path))
    shard = os.path.join(bad, idx["weight_map"].pop("model.layers.1.mlp.up_proj.weight"))
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard)
    json.dump(idx, open(idx_path, "w"))
    _assert_clean_failure(*_merge(tmp_path, bad), "has no tensor", "model.layers.1.mlp.up_proj.weight")


def test_shape_mismatch(tmp_path, good):
    wide = LlamaShape(**{**TINY.__dict__, "intermediate": 64})
    other = write_model(str(tmp_path / "wide"), random_weights(wide, 2), wide.config("bfloat16"))
    _assert_clean_failure(*_merge(tmp_path, other), "shape mismatch", "mlp")


def test_unsupported_dtype(tmp_path, good):
    weights = random_weights(TINY, 3)
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(TINY.intermediate, TINY.hidden, dtype=torch.int32)
    other = write_model(str(tmp_path / "ints"), weights, TINY.config("bfloat16"))
    _assert_clean_failure(*_merge(tmp_path, other), "I32", "floating-point")


def test_unreachable_path(tmp_path, good):
    _assert_clean_failure(*_merge(tmp_path, str(tmp_path / "nowhere")), "does not exist")


def test_truncated_file(tmp_path, good):
    bad = _bad_copy(tmp_path, good)
    shard = _first_shard(bad)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    _assert_clean_failure(*_merge(tmp_path, bad), "truncated")


def test_malformed_header(tmp_path, good):
    bad = _bad_copy(tmp_path, good)
    shard = _first_shard(bad)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    _assert_clean_failure(*_merge(tmp_path, bad), "malformed")


def test_not_safetensors(tmp_path, good):
    bad = _bad_copy(tmp_path, good)
    with open(_first_shard(bad), "wb") as f:
        f.write(b"PK\x03\x04 a zip file, say a pickle checkpoint")
    _assert_clean_failure(*_merge(tmp_path, bad), "malformed")


@pytest.mark.parametrize("target", ["../good/model-00001-of-00003.safetensors", "/etc/passwd", "s3://bucket/x.safetensors"])
def test_weight_map_outside_folder(tmp_path, good, target):
    bad = _bad_copy(tmp_path, good)
    idx_path = os.path.join(bad, "model.safetensors.index.json")
    idx = json.load(open(idx_path))
    idx["weight_map"]["model.norm.weight"] = target
    json.dump(idx, open(idx_path, "w"))
    _assert_clean_failure(*_merge(tmp_path, bad), "outside the model folder")


def test_nan_produced_is_an_error_and_output_removed(tmp_path, good):
    weights = random_weights(TINY, 4)
    weights["model.layers.2.self_attn.o_proj.weight"][3, 5] = float("inf")
    other = write_model(str(tmp_path / "inf"), weights, TINY.config("bfloat16"))
    _assert_clean_failure(*_merge(tmp_path, other), "model.layers.2.self_attn.o_proj.weight", "--allow-nan")


def test_allow_nan_writes_it(tmp_path, good):
    weights = random_weights(TINY, 4)
    weights["model.layers.2.self_attn.o_proj.weight"][3, 5] = float("inf")
    other = write_model(str(tmp_path / "inf"), weights, TINY.config("bfloat16"))
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {good}
    parameters: {{weight: 0.5}}
  - model: {other}
    parameters: {{weight: 0.5}}
""")
    result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "--quiet", "--allow-nan"])
    assert result.exit_code == 0, result.output
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")


def test_failure_keeps_users_existing_folder_but_not_our_files(tmp_path, good):
    weights = random_weights(TINY, 4)
    weights["model.norm.weight"][0] = float("nan")
    other = write_model(str(tmp_path / "inf"), weights, TINY.config("bfloat16"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors.index.json").write_text("{}")  # from an earlier merge
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {good}
    parameters: {{weight: 0.5}}
  - model: {other}
    parameters: {{weight: 0.5}}
""")
    result = CliRunner().invoke(main, ["run", recipe, str(out), "--quiet", "--overwrite"])
    assert result.exit_code == 1 and "NaN" in result.stderr
    # the user's file and the earlier merge stay as they were; nothing of this run is left
    assert sorted(os.listdir(out)) == ["model.safetensors.index.json", "notes.txt"]
    assert (out / "model.safetensors.index.json").read_text() == "{}"


def _index_of(folder: str) -> tuple[str, dict]:
    path = os.path.join(folder, "model.safetensors.index.json")
    return path, json.load(open(path))


def test_tensor_in_a_shard_but_not_in_the_index(tmp_path, good):
    bad = _bad_copy(tmp_path, good)
    path, idx = _index_of(bad)
    idx["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
    json.dump(idx, open(path, "w"))
    _assert_clean_failure(*_merge(tmp_path, bad), "model.layers.1.mlp.up_proj.weight", "not in model.safetensors.index.json")


def test_index_puts_a_tensor_in_another_shard(tmp_path, good):
    bad = _bad_copy(tmp_path, good)
    path, idx = _index_of(bad)
    wm = idx["weight_map"]
    here = wm["model.layers.1.mlp.up_proj.weight"]
    elsewhere = next(f for f in wm.values() if f != here)
    wm["model.layers.1.mlp.up_proj.weight"] = elsewhere
    json.dump(idx, open(path, "w"))
    _assert_clean_failure(*_merge(tmp_path, bad), "model.layers.1.mlp.up_proj.weight", here, elsewhere)


class EndpointConnectionError(Exception):
    """Stands in for botocore's: a storage library's own exception type."""


def test_storage_library_error_is_one_line(tmp_path, good, monkeypatch):
    from dmerge.io import storage

    real = storage.map_range

    def failing(location, offset, length):
        if offset > 4096:
            raise EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket"\n'
                                          "  (and more detail on a second line)")
        return real(location, offset, length)

    monkeypatch.setattr(storage, "map_range", failing)
    code, output, out = _merge(tmp_path, good)
    _assert_clean_failure(code, output, out, "EndpointConnectionError", "Could not connect", "--debug")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yml"), out, "--quiet", "--debug"])
    assert result.exit_code == 1 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
