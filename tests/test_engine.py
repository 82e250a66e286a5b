"""End-to-end merges: correct rounding against a float64 reference, invariance to
chunking and worker count, the output folder's contents."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import bf16_ulp, compare_with_mergekit, load_folder, run_merge, shard_bytes, write_recipe


def _reference(family, fn):
    """fn(parents, name, abs_mode) -> float64 result; with abs_mode it gets |x| and must
    use |coefficients|, giving the magnitude that bounds the reference's own rounding."""
    parents = {k: load_folder(v) for k, v in family.items()}
    names = parents["base"].keys()
    out = {}
    for n in names:
        p = {k: q[n].double() for k, q in parents.items()}
        out[n] = (fn(p, n, False), fn({k: v.abs() for k, v in p.items()}, n, True))
    return out


def _layer_t(name: str, n_layers: int = 4) -> float:
    if ".layers." not in name:
        return 0.0
    i = int(name.split(".layers.")[1].split(".")[0])
    return i / (n_layers - 1)


def _assert_correctly_rounded(out: dict, ref: dict) -> None:
    total = bad = 0
    for name, (r, magnitude) in ref.items():
        o = out[name]
        assert o.dtype == torch.bfloat16, name
        err = (o.double() - r).abs()
        # Half an ulp (of the smaller neighbour at a binade edge), plus the float64
        # reference's own rounding error: a few units of 2^-53 of the terms' magnitude.
        half = 0.5 * torch.minimum(bf16_ulp(o), bf16_ulp(r))
        bad += int((err > half + 8 * 2.0**-53 * magnitude).sum())
        total += r.numel()
    assert bad <= 1e-5 * total, f"{bad} of {total} elements off by more than half a bf16 ulp"


def test_linear_correctly_rounded(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 0.5}}
  - model: {family['ft2']}
    parameters: {{weight: 0.3}}
  - model: {family['ft3']}
    parameters: {{weight: 0.2}}
dtype: bfloat16
""")
    run_merge(recipe, str(tmp_path / "out"))
    ref = _reference(family, lambda p, n, _: (0.5 * p["ft1"] + 0.3 * p["ft2"] + 0.2 * p["ft3"]) / 1.0)
    _assert_correctly_rounded(load_folder(str(tmp_path / "out")), ref)


def test_linear_unnormalized_with_gradient_and_filter(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
parameters:
  normalize: false
models:
  - model: {family['ft1']}
    parameters:
      weight:
        - filter: self_attn
          value: [1.0, 0.0]
        - value: 0.25
  - model: {family['ft2']}
    parameters: {{weight: 0.75}}
dtype: bfloat16
""")
    run_merge(recipe, str(tmp_path / "out"))

    def f(p, n, _):
        w1 = (1.0 - _layer_t(n)) if "self_attn" in n else 0.25
        return w1 * p["ft1"] + 0.75 * p["ft2"]

    _assert_correctly_rounded(load_folder(str(tmp_path / "out")), _reference(family, f))


def test_task_arithmetic_negation_correctly_rounded(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: task_arithmetic
base_model: {family['base']}
parameters:
  lambda: 0.9
models:
  - model: {family['ft1']}
    parameters: {{weight: 1.0}}
  - model: {family['ft2']}
    parameters: {{weight: -0.5}}
  - model: {family['ft3']}
    parameters: {{weight: [0.2, 0.6]}}
dtype: bfloat16
""")
    run_merge(recipe, str(tmp_path / "out"))

    def f(p, n, magnitude):
        b = p["base"]
        w3 = 0.2 + 0.4 * _layer_t(n)
        if magnitude:
            return b + 0.9 * sum(w * (p[k] + b) for w, k in ((1.0, "ft1"), (0.5, "ft2"), (w3, "ft3")))
        return b + 0.9 * (1.0 * (p["ft1"] - b) - 0.5 * (p["ft2"] - b) + w3 * (p["ft3"] - b))

    _assert_correctly_rounded(load_folder(str(tmp_path / "out")), _reference(family, f))


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "unsupported", "absent"])
def test_passthrough_is_byte_copy(family, tmp_path, monkeypatch, kernel_copy):
    """Byte copies go through copy_file_range; where the kernel refuses it (EXDEV across
    filesystems on old kernels) or Python lacks it, the read-and-write path gives the same bytes."""
    import errno
    import os

    calls = []
    real = getattr(os, "copy_file_range", None)

    def refusing(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device")

    def counting(*args):
        calls.append(args)
        return real(*args)

    if kernel_copy == "unsupported":
        monkeypatch.setattr(os, "copy_file_range", refusing)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif real is not None:
        monkeypatch.setattr(os, "copy_file_range", counting)
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: passthrough
models:
  - model: {family['ft2']}
""")
    run_merge(recipe, str(tmp_path / "out"), "--chunk-size", "4K")
    out = load_folder(str(tmp_path / "out"))
    src = load_folder(family["ft2"])
    assert out.keys() == src.keys()
    for k in src:
        assert torch.equal(out[k].view(torch.int16), src[k].view(torch.int16)), k
    if kernel_copy != "absent" and real is not None:
        assert calls  # the kernel path was taken (or tried)


LINEAR = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.4}}
dtype: bfloat16
"""


@pytest.mark.parametrize("extra", [["--chunk-size", "2K"], ["--workers", "3", "--threads-per-worker", "1"],
                                   ["--workers", "2", "--processes", "--chunk-size", "16K"]])
def test_output_bytes_independent_of_split(family, tmp_path, extra):
    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(**family))
    run_merge(recipe, str(tmp_path / "one"), "--workers", "1", "--out-shard-size", "100K")
    run_merge(recipe, str(tmp_path / "other"), "--out-shard-size", "100K", *extra)
    a, b = shard_bytes(str(tmp_path / "one")), shard_bytes(str(tmp_path / "other"))
    assert len(a) > 1 and a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_output_folder_contents(family, tmp_path):
    tok = os.path.join(family["base"], "tokenizer_config.json")
    with open(tok, "w") as f:
        json.dump({"model_max_length": 256}, f)
    try:
        recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(**family))
        out = tmp_path / "out"
        run_merge(recipe, str(out), "--out-shard-size", "100K")
    finally:
        os.remove(tok)
    files = set(os.listdir(out))
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and len(shards) > 1
    assert {"config.json", "model.safetensors.index.json", "mergekit_config.yml", "README.md", "tokenizer_config.json"} <= files
    assert not any(f.endswith(".partial") for f in files)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in load_folder(str(out)).values())
    cfg = json.load(open(out / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 4
    card = open(out / "README.md").read()
    assert card.startswith("---") and "dmerge" in card and "task_arithmetic" in card


def test_out_dtype_float32(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(**family).replace("dtype: bfloat16", "dtype: float32\nout_dtype: float16"))
    run_merge(recipe, str(tmp_path / "out"))
    out = load_folder(str(tmp_path / "out"))
    assert all(t.dtype == torch.float16 for t in out.values())
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "float16"


def test_transformers_loads_output(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(**family))
    run_merge(recipe, str(tmp_path / "out"), "--out-shard-size", "100K")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_agrees_with_mergekit(family, tmp_path, method):
    from mergekit_oracle import run_mergekit

    text = f"""
merge_method: {method}
base_model: {family['base']}
models:
  - model: {family['ft1']}
    parameters:
      weight: [0.2, 0.8]
  - model: {family['ft2']}
    parameters:
      weight:
        - filter: mlp
          value: -0.3
        - value: 0.5
  - model: {family['base']}
    parameters: {{weight: 0.4}}
dtype: bfloat16
"""
    recipe = write_recipe(tmp_path / "r.yml", text)
    run_merge(recipe, str(tmp_path / "ours"))
    run_mergekit(text, str(tmp_path / "theirs"))
    ours, theirs = load_folder(str(tmp_path / "ours")), load_folder(str(tmp_path / "theirs"))
    parents = {k: load_folder(v) for k, v in family.items()}

    def reference(name):
        t = _layer_t(name)
        w = {"ft1": 0.2 + 0.6 * t, "ft2": -0.3 if "mlp" in name else 0.5, "base": 0.4}
        x = {k: parents[k][name].double() for k in w}
        if method == "linear":
            return sum(w[k] * x[k] for k in w) / sum(w.values())
        return x["base"] + sum(w[k] * (x[k] - x["base"]) for k in ("ft1", "ft2"))

    compare_with_mergekit(ours, theirs, reference)
