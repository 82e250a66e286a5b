"""zarr v3 output and input: ``--output-format zarr``, ``export-safetensors``, zarr
groups as parents. The reference everywhere is the same merge written as safetensors:
the round trip must give it back byte for byte, bf16 included."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from conftest import TINY, TIES, load_folder, run_merge, write_recipe
from dmerge.cli import main
from dmerge.toymodels import random_weights, write_model

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PASSTHROUGH = """
slices:
  - sources:
      - model: {model}
        layer_range: [0, 4]
merge_method: passthrough
"""


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _export(group: str, out: str, *extra: str):
    result = CliRunner().invoke(main, ["export-safetensors", group, out, "-q", *extra])
    assert result.exit_code == 0, result.output
    return result


def _merge_both(recipe: str, tmp_path, *extra: str) -> tuple[str, str]:
    """The same merge written as safetensors and as zarr (folders with the same base
    name, so the model cards, which carry it, agree)."""
    st, zr = str(tmp_path / "st" / "out"), str(tmp_path / "zr" / "out")
    run_merge(recipe, st, *extra)
    run_merge(recipe, zr, "--output-format", "zarr", *extra)
    return st, zr


def _tensor_bytes(folder: str) -> dict[str, tuple[str, list, bytes]]:
    """name -> (safetensors dtype, shape, raw bytes) of every tensor of an HF folder."""
    out = {}
    for n in sorted(os.listdir(folder)):
        if n.endswith(".safetensors"):
            with open(os.path.join(folder, n), "rb") as f:
                raw = f.read()
            size = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + size])
            header.pop("__metadata__", None)
            for name, e in header.items():
                b, end = e["data_offsets"]
                out[name] = (e["dtype"], e["shape"], raw[8 + size + b:8 + size + end])
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_is_byte_identical(family, tmp_path, dtype):
    """safetensors -> zarr -> safetensors: every file of the export equals the direct
    merge's (shards, index, config, recipe, card), with tensors split over several zarr
    shards and the model over several safetensors shards."""
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family).replace("dtype: bfloat16", f"dtype: {dtype}"))
    st, zr = _merge_both(recipe, tmp_path, "--chunk-size", "8K", "--out-shard-size", "100K")
    assert not any(n.endswith(".safetensors") for n in os.listdir(zr))
    layout = json.load(open(os.path.join(zr, "model.layers.0.mlp.down_proj.weight", "zarr.json")))
    assert layout["codecs"][0]["name"] == "sharding_indexed"
    assert layout["chunk_grid"]["configuration"]["chunk_shape"][0] < 64  # split over several zarr shards
    ex = str(tmp_path / "ex" / "out")
    _export(zr, ex)
    direct, exported = _files(st), _files(ex)
    assert len([n for n in direct if n.endswith(".safetensors")]) > 1
    assert exported.keys() == direct.keys()
    for name in direct:
        assert exported[name] == direct[name], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_special_bit_patterns_survive(tmp_path, dtype):
    """Bytes are bytes: -0.0 everywhere in a tensor (which a float comparison with the
    fill value 0 would drop), NaN payloads and infinities come back as they went in,
    for float16 and both float8 formats (copied bytes: passthrough)."""
    weights = random_weights(TINY, 7, "float32")
    weights = {k: v.to(dtype) for k, v in weights.items()}
    bits = torch.uint8 if dtype.itemsize == 1 else torch.int16
    weights["model.layers.1.mlp.up_proj.weight"] = torch.full(TINY.tensor_shapes()["model.layers.1.mlp.up_proj.weight"],
                                                              -0.0).to(dtype)
    special = weights["model.layers.2.self_attn.o_proj.weight"].view(bits).clone()
    special.view(-1)[:4] = torch.tensor([0x7C01, 0x7E00, -1024, 0x7C00] if bits == torch.int16 else [0x7F, 0xFF, 0x80, 0x7C],
                                        dtype=torch.int32).to(bits)
    weights["model.layers.2.self_attn.o_proj.weight"] = special.view(dtype)
    model = write_model(str(tmp_path / "model"), weights, TINY.config("float16"))
    recipe = write_recipe(tmp_path / "r.yml", PASSTHROUGH.format(model=model))
    st, zr = _merge_both(recipe, tmp_path, "--chunk-size", "4K")
    ex = str(tmp_path / "ex" / "out")
    _export(zr, ex)
    assert _files(ex) == _files(st)
    code = {torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]
    assert {d for d, _, _ in _tensor_bytes(ex).values()} == {code}
    name = {torch.float16: "float16", torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}[dtype]
    assert json.load(open(os.path.join(zr, "model.layers.0.mlp.down_proj.weight", "zarr.json")))["data_type"] == name


def test_zarr_output_does_not_depend_on_chunk_size(family, tmp_path):
    """Different --chunk-size: different zarr shards, the same arrays, the same export."""
    import zarr

    import dmerge.io.zarr_dtypes  # noqa: F401 - bf16 arrays

    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
    a, b = str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")
    run_merge(recipe, a, "--output-format", "zarr", "--chunk-size", "5K")
    run_merge(recipe, b, "--output-format", "zarr", "--chunk-size", "64K")
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = [t["name"] for t in ga.attrs["dmerge"]["tensors"]]
    assert names == [t["name"] for t in gb.attrs["dmerge"]["tensors"]]
    shards = lambda g, n: g[n].shards[0]  # noqa: E731
    assert any(shards(ga, n) != shards(gb, n) for n in names)
    for n in names:
        assert np.array_equal(ga[n][...], gb[n][...]), n
    _export(a, str(tmp_path / "ea" / "out"))
    _export(b, str(tmp_path / "eb" / "out"))
    assert _files(str(tmp_path / "ea" / "out")) == _files(str(tmp_path / "eb" / "out"))


def test_zarr_group_as_merge_input(family, tmp_path):
    """Parents stored as zarr groups give the same bytes as their safetensors twins:
    computed tensors (ties reads rows through zarr at another chunking than the groups
    were written with) and copied ones (passthrough)."""
    twins = {}
    for key in ("ft1", "ft2"):
        recipe = write_recipe(tmp_path / f"{key}.yml", PASSTHROUGH.format(model=family[key]))
        twins[key] = _merge_both(recipe, tmp_path / key, "--chunk-size", "6K")
    st_twins = {k: v[0] for k, v in twins.items()}
    zr_twins = {k: v[1] for k, v in twins.items()}
    from_st = str(tmp_path / "from_st" / "out")
    from_zr = str(tmp_path / "from_zr" / "out")
    run_merge(write_recipe(tmp_path / "a.yml", TIES.format(base=family["base"], **st_twins)), from_st, "--chunk-size", "4K")
    run_merge(write_recipe(tmp_path / "b.yml", TIES.format(base=family["base"], **zr_twins)), from_zr, "--chunk-size", "4K")
    a, b = _tensor_bytes(from_st), _tensor_bytes(from_zr)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    # a copy out of a zarr group: the twin's bytes again
    copied = str(tmp_path / "copied" / "out")
    run_merge(write_recipe(tmp_path / "c.yml", PASSTHROUGH.format(model=zr_twins["ft1"])), copied, "--chunk-size", "3K")
    assert _tensor_bytes(copied) == _tensor_bytes(st_twins["ft1"])


def test_zarr_input_reads_only_the_shards_it_needs(family, tmp_path, monkeypatch):
    """A row read fetches the zarr shard covering the rows (its index and the inner
    chunks needed), not the array."""
    import zarr

    from dmerge.io.model_source import open_model
    from dmerge.tasks import read_rows

    recipe = write_recipe(tmp_path / "r.yml", PASSTHROUGH.format(model=family["ft1"]))
    zr = str(tmp_path / "zr")
    run_merge(recipe, zr, "--output-format", "zarr", "--chunk-size", "4K")
    source = open_model(zr)
    loc = source.tensor("model.layers.0.mlp.gate_proj.weight")
    name = loc.entry.name
    layout = json.load(open(os.path.join(zr, name, "zarr.json")))
    shard_rows = layout["chunk_grid"]["configuration"]["chunk_shape"][0]
    assert len(os.listdir(os.path.join(zr, name, "c"))) > 2
    fetched = []
    get = zarr.storage.LocalStore.get

    async def counting(self, key, *args, **kwargs):
        fetched.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting)
    r0, r1 = shard_rows + 1, 2 * shard_rows - 1
    data, n = read_rows(loc.file, loc.entry, r0, r1)
    assert {k for k in fetched if k != f"{name}/zarr.json"} == {f"{name}/c/1/0"}, fetched
    with safe_open(os.path.join(family["ft1"], _shard_of(family["ft1"], name)), "pt") as f:
        expected = f.get_tensor(name)[r0:r1]
    assert n == expected.numel() * 2
    assert torch.equal(data.view(torch.bfloat16).reshape(expected.shape), expected)


def _shard_of(folder: str, name: str) -> str:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        return json.load(open(index))["weight_map"][name]
    return "model.safetensors"


def test_group_is_readable_by_zarr_python(family, tmp_path):
    """zarr.open_group reads the group: attributes (config, recipe), every array's shape
    and values; bf16 arrays hold the bit patterns (once dmerge's data types are known to
    zarr: `import dmerge.io.zarr_dtypes`)."""
    import zarr

    import dmerge.io.zarr_dtypes  # noqa: F401

    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
    st, zr = _merge_both(recipe, tmp_path, "--chunk-size", "8K")
    g = zarr.open_group(zr, mode="r")
    attrs = g.attrs["dmerge"]
    assert attrs["complete"] is True and attrs["config"] == json.load(open(os.path.join(st, "config.json")))
    assert "merge_method: ties" in attrs["recipe"]
    expected = load_folder(st)
    assert sorted(g.array_keys()) == sorted(expected)
    for name, tensor in expected.items():
        array = g[name]
        assert tuple(array.shape) == tuple(tensor.shape)
        assert array.metadata.data_type.to_json(3) == "bfloat16" and array.attrs["safetensors_dtype"] == "BF16"
        assert torch.equal(torch.from_numpy(array[...].astype(np.int16)).view(torch.bfloat16), tensor)


def _fake_install(tmp_path) -> str:
    """A dist-info declaring pyproject.toml's ``zarr.data_type`` entry points, the way an
    installed dmerge declares them."""
    import tomllib

    with open(os.path.join(WORKTREE, "pyproject.toml"), "rb") as f:
        points = tomllib.load(f)["project"]["entry-points"]["zarr.data_type"]
    site = tmp_path / "site"
    info = site / "dmerge_probe-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dmerge-probe\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[zarr.data_type]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    return str(site)


PLAIN_READER = """
import hashlib, json, sys
import zarr
g = zarr.open_group(sys.argv[1], mode="r")
out = {"attrs": sorted(g.attrs["dmerge"]), "arrays": {}}
try:
    names = sorted(g.array_keys())
    out["listing"] = "ok"
except ValueError:  # listing parses every array's metadata, bf16 ones included
    names = sorted(t["name"] for t in g.attrs["dmerge"]["tensors"])
    out["listing"] = "unreadable"
for name in names:
    try:
        a = g[name][...]
    except ValueError as e:  # a data type this zarr does not know
        out["arrays"][name] = ["unreadable", str(e)]
        continue
    out["arrays"][name] = [list(a.shape), str(a.dtype), hashlib.sha256(a.tobytes()).hexdigest()]
out["dmerge_imported"] = "dmerge" in sys.modules
print(json.dumps(out))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_group_opens_in_a_plain_zarr_python(family, tmp_path, dtype):
    """A process that imports only zarr: the group and its float32/float16 arrays read
    as they are. zarr-python 3.1 collects the ``zarr.data_type`` entry points dmerge
    declares but never loads them, so there a bf16 array stays unreadable (one clear
    ValueError, as is listing the group's members, which parses them) until
    ``import dmerge.io.zarr_dtypes``; the group itself and its attributes open."""
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family).replace("dtype: bfloat16", f"dtype: {dtype}"))
    st, zr = _merge_both(recipe, tmp_path, "--chunk-size", "8K")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_fake_install(tmp_path), WORKTREE]))
    run = subprocess.run([sys.executable, "-c", PLAIN_READER, zr], capture_output=True, text=True, env=env,
                         timeout=120, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert "tensors" in seen["attrs"] and "config" in seen["attrs"]
    tensors = _tensor_bytes(st)
    assert sorted(seen["arrays"]) == sorted(tensors)
    for name, (code, shape, raw) in tensors.items():
        if code == "BF16":
            assert seen["arrays"][name][0] == "unreadable" and "bfloat16" in seen["arrays"][name][1]
        else:
            assert seen["arrays"][name] == [shape, {"F32": "float32"}[code], hashlib.sha256(raw).hexdigest()]
    assert seen["listing"] == ("unreadable" if dtype == "bfloat16" else "ok")
    assert not seen["dmerge_imported"]


def test_failed_merge_leaves_no_group(family, tmp_path, monkeypatch):
    """A merge that fails after some arrays were written: no zarr.json at the root at any
    time before the end (a kill at that moment leaves no group that opens), and the
    failure removes what the run wrote."""
    import zarr

    from dmerge.io import zarr_store

    out = str(tmp_path / "out")
    seen = {}
    write = zarr_store.ZarrArraySink.write

    def failing(self, tensor, row_start, data):
        if tensor.name == "model.norm.weight":
            seen["root marker"] = os.path.exists(os.path.join(out, "zarr.json"))
            seen["written arrays"] = sum(os.path.isdir(os.path.join(out, n, "c")) for n in os.listdir(out))
            try:
                zarr.open_group(out, mode="r")
                seen["opens"] = True
            except Exception:  # noqa: BLE001
                seen["opens"] = False
            raise OSError("disk on fire")
        return write(self, tensor, row_start, data)

    monkeypatch.setattr(zarr_store.ZarrArraySink, "write", failing)
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", "--output-format", "zarr", "--workers", "1",
                                       "--threads-per-worker", "1"])
    assert result.exit_code == 1
    assert "disk on fire" in result.stderr and result.stderr.count("\n") == 1
    assert seen["written arrays"] > 0 and seen["root marker"] is False and seen["opens"] is False
    assert not os.path.exists(out)
    # into an existing empty folder: emptied again, the folder kept
    os.makedirs(out)
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", "--output-format", "zarr"])
    assert result.exit_code == 1 and os.listdir(out) == []


def test_existing_group_needs_overwrite_and_resume_is_refused(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
    out = str(tmp_path / "out")
    run_merge(recipe, out, "--output-format", "zarr")
    before = json.load(open(os.path.join(out, "zarr.json")))
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", "--output-format", "zarr"])
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert json.load(open(os.path.join(out, "zarr.json"))) == before
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", "--output-format", "zarr", "--resume"])
    assert result.exit_code == 1 and "--resume" in result.stderr and result.stderr.count("\n") == 1
    linear = write_recipe(tmp_path / "l.yml", PASSTHROUGH.format(model=family["ft1"]))
    run_merge(linear, out, "--output-format", "zarr", "--overwrite")
    ex = str(tmp_path / "ex")
    _export(out, ex)
    assert _tensor_bytes(ex) == _tensor_bytes(family["ft1"])
    # names in the group's attributes never reach outside the export folder
    meta = json.load(open(os.path.join(out, "zarr.json")))
    meta["attributes"]["dmerge"]["files"].append("../escaped.txt")
    json.dump(meta, open(os.path.join(out, "zarr.json"), "w"))
    result = CliRunner().invoke(main, ["export-safetensors", out, str(tmp_path / "ex2"), "-q"])
    assert result.exit_code == 1 and "outside" in result.stderr
    assert not os.path.exists(tmp_path / "ex2") and not os.path.exists(tmp_path / "escaped.txt")


def test_export_refuses_what_is_not_a_complete_dmerge_group(tmp_path):
    import zarr

    plain = str(tmp_path / "plain")
    zarr.create_group(plain, attributes={"x": 1})
    result = CliRunner().invoke(main, ["export-safetensors", plain, str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and "not written by dmerge" in result.stderr
    assert not os.path.exists(tmp_path / "out")
    result = CliRunner().invoke(main, ["export-safetensors", str(tmp_path / "missing"), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")


def test_zarr_group_in_a_bucket(family, tmp_path):
    """Out to and back from S3 (moto's server on 127.0.0.1): the workers write the zarr
    shards through zarr's FsspecStore, the export reads them back byte for byte, and
    the group in the bucket serves as a parent."""
    import fsspec

    from s3stand import S3Stand

    stand = S3Stand()
    try:
        stand.boto().create_bucket(Bucket="merges")
        options = ["--storage-options", json.dumps({"s3": stand.options()})]
        recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
        st = str(tmp_path / "st" / "out")
        run_merge(recipe, st, "--chunk-size", "8K", "--out-shard-size", "100K")
        url = "s3://merges/out"
        run_merge(recipe, url, "--output-format", "zarr", "--out-shard-size", "100K", *options)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **stand.options())
        assert fs.exists("merges/out/zarr.json") and fs.exists("merges/out/config.json")
        ex = str(tmp_path / "ex" / "out")
        _export(url, ex, *options)
        assert _files(ex) == _files(st)
        copied = str(tmp_path / "copied")
        run_merge(write_recipe(tmp_path / "p.yml", PASSTHROUGH.format(model=url)), copied, *options)
        assert _tensor_bytes(copied) == _tensor_bytes(st)
    finally:
        stand.stop()


def test_chunks_are_whole_shards_of_whole_inner_chunks():
    """For zarr output every task's rows are one zarr shard of whole inner chunks of at
    most INNER_CHUNK_BYTES (a row at least), and aligning a plan loses fewer rows per
    chunk than it has inner chunks."""
    import random
    from types import SimpleNamespace

    from dmerge.io.zarr_store import INNER_CHUNK_BYTES, _split, layout_of

    rng = random.Random(0)
    for _ in range(3000):
        row_bytes, planned = rng.randint(1, 1 << 16), rng.randint(1, 100_000)
        rows, inner = _split(planned, row_bytes, INNER_CHUNK_BYTES)
        assert rows % inner == 0 and planned - rows < rows // inner
        tp = SimpleNamespace(shape=(10**7, 3), rows=10**7, row_bytes=row_bytes, rows_per_chunk=rows, n_chunks=2)
        layout = layout_of(tp)
        assert layout.shard_rows == rows and rows % layout.inner_rows == 0
        assert layout.inner_rows * row_bytes <= max(INNER_CHUNK_BYTES, row_bytes)


def test_zarr_parents_with_a_merged_tokenizer(tmp_path):
    """Parents as zarr groups in a tokenizer union: the vocabulary rows are gathered
    through zarr (row sets, not chunks), the tokenizers load from the files kept beside
    the groups; the same bytes as with the safetensors twins."""
    pytest.importorskip("transformers")
    from dmerge.toymodels import LlamaShape, write_wordlevel_tokenizer

    words = [f"w{i}" for i in range(40)]
    twins = {}
    for i, (name, extra, special) in enumerate([("A", [], ["<|im_end|>"]), ("B", ["kiwi", "mango"], ["<tool>"])]):
        shape = LlamaShape(hidden=32, layers=4, intermediate=64, heads=4, kv_heads=2, vocab=3 + 40 + len(extra) + 1)
        folder = write_model(str(tmp_path / name), random_weights(shape, 30 + i), shape.config("bfloat16"))
        write_wordlevel_tokenizer(folder, words + extra, special, [])
        recipe = write_recipe(tmp_path / f"{name}.yml", PASSTHROUGH.format(model=folder))
        twins[name] = _merge_both(recipe, tmp_path / f"twin{name}", "--chunk-size", "2K")
    union = """
merge_method: linear
base_model: {A}
models:
  - model: {A}
    parameters: {{weight: 0.6}}
  - model: {B}
    parameters: {{weight: 0.4}}
tokenizer_source: union
dtype: bfloat16
"""
    outs = []
    for which in (0, 1):
        out = str(tmp_path / f"union{which}" / "out")
        run_merge(write_recipe(tmp_path / f"u{which}.yml", union.format(A=twins["A"][which], B=twins["B"][which])),
                  out, "--chunk-size", "1K")
        outs.append(out)
    assert os.path.exists(os.path.join(twins["A"][1], "tokenizer.json"))
    a, b = _tensor_bytes(outs[0]), _tensor_bytes(outs[1])
    assert a["model.embed_tokens.weight"][1][0] == 3 + 40 + 2 + 2
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
