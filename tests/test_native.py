"""The fused CPU kernels (dmerge/native) give the torch path's bytes, bit for bit.

Every task-arithmetic method is run chunk by chunk twice on the same inputs, once with
the kernels and once with ``DMERGE_NATIVE=0``, over input and output dtypes, row
splittings, heavy magnitude ties at the top-k threshold, signed zeros, infinities and
NaN, negative and cancelling weights; the histogram kernel is checked against the torch
bincount it replaces; a failing compiler falls back to torch.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from dmerge import native
from dmerge.methods import ChunkInputs, get_method
from dmerge.methods import _sparsify as sp

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the kernels cannot be built")

SHAPE = (41, 67)


def resolved(method, shared: dict, per_model: list[dict]) -> tuple[dict, list[dict]]:
    """Parameters with the method's defaults filled in (the base model first)."""
    params = {p.name: shared.get(p.name, p.default) for p in method.params}
    models = [{}]
    for given in per_model:
        models.append({p.name: given.get(p.name, p.default) for p in method.model_params})
    return params, models


def parents(seed: int, n_models: int, dtype: torch.dtype, specials: bool) -> list[torch.Tensor]:
    """base + fine-tunes whose task vectors have few distinct magnitudes (ties at any
    threshold), exact zeros, and optionally signed zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    out = [base]
    for _ in range(n_models):
        steps = torch.randint(-3, 4, SHAPE, generator=g).double() * 0.01  # 7 values: heavy ties, zeros
        noise = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 1e-3
        pick = torch.rand(SHAPE, generator=g)
        # a quarter unrelated to the base: differences with all their low bits in use
        scale = torch.pow(2.0, -torch.randint(0, 24, SHAPE, generator=g).double())
        unrelated = torch.randn(SHAPE, generator=g, dtype=torch.float64) * scale
        out.append(torch.where(pick < 0.4, base + steps, torch.where(pick < 0.75, base + noise, unrelated)))
    out = [t.to(dtype) for t in out]
    if specials:
        # signed zeros everywhere in row 0 (negative weights turn +0 task vectors into -0)
        zeros = torch.tensor([0.0, -0.0])
        out[0][0] = zeros[torch.arange(SHAPE[1]) % 2]
        for k, t in enumerate(out[1:]):
            t[0] = zeros[(torch.arange(SHAPE[1]) >> (k + 1)) % 2]
        # row 3: only the last model moves, and it moves down (its task vector is all
        # that can decide the sign of a zero result on a -0 base)
        out[0][3] = -0.0
        for t in out[1:-1]:
            t[3] = zeros[torch.arange(SHAPE[1]) % 2]
        out[-1][3] = -1.0
        out[1][0, 40] = float("inf")
        out[2][1, 3] = float("nan")
        out[0][2, 7] = float("-inf")
    return out


def run_chunks(name: str, tensors: list[torch.Tensor], params: dict, model_params: list[dict],
               row_splits: list[int], out_dtype: torch.dtype, seed: int = 7) -> torch.Tensor:
    """A method's statistics and merge chunk by chunk, as the engine runs them."""
    method = get_method(name)
    bounds = [0, *row_splits, SHAPE[0]]

    def chunk(r0, r1, stats):
        return ChunkInputs(tensor_name="model.layers.0.mlp.up_proj.weight", tensors=[t[r0:r1] for t in tensors],
                           base_index=0, params=params, model_params=model_params, full_shape=SHAPE,
                           row_start=r0, row_stop=r1, seed=seed, compute_dtype=torch.float64,
                           out_dtype=out_dtype, stats=dict(stats))

    stats: dict = {}
    rnd = random.Random(len(row_splits))
    for stat in method.statistics:
        ctx = ChunkInputs(tensor_name="model.layers.0.mlp.up_proj.weight", tensors=[], base_index=0, params=params,
                          model_params=model_params, full_shape=SHAPE, stats=dict(stats), seed=seed)
        if not stat.applies(ctx):
            continue
        partials = [stat.chunk(chunk(r0, r1, stats)) for r0, r1 in zip(bounds, bounds[1:])]
        rnd.shuffle(partials)
        stats[stat.name] = stat.final(stat.combine_all(partials), ctx)
    return torch.cat([method.fn(chunk(r0, r1, stats)) for r0, r1 in zip(bounds, bounds[1:])])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bytes, except that a NaN only has to be a NaN (its payload bits may differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a.double())
    assert torch.equal(nan, torch.isnan(b.double()))
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = (a.view(width) != b.view(width)) & ~nan
    assert not bool(diff.any()), f"{int(diff.sum())} elements differ, first at {diff.nonzero()[0].tolist()}"


CASES = {
    "ties": ("ties", {}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.9}]),
    "ties_lambda": ("ties", {"lambda": 0.8, "normalize": False},
                    [{"weight": 1.0, "density": 0.5}, {"weight": -0.5, "density": 0.2}, {"weight": 0.5, "density": 1}]),
    "ties_cancelling": ("ties", {}, [{"weight": 1.0, "density": 0.4}, {"weight": -1.0, "density": 0.4},
                             {"weight": 0.0, "density": 0.6}]),
    "ties_rescaled": ("ties", {"rescale": True}, [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.6},
                                          {"weight": 0.3, "density": 0.0}]),
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.3}, [{"weight": 0.5}, {"weight": -0.25}, {"weight": 0.75}]),
    "task_arithmetic_normalized": ("task_arithmetic", {"normalize": True}, [{"weight": 0.5}, {"weight": 0.25}, {"weight": 0.75}]),
    "dare_ties": ("dare_ties", {}, [{"weight": 0.5, "density": 0.6}, {"weight": 0.3, "density": 0.4}, {"weight": 0.2, "density": 1}]),
    "dare_linear": ("dare_linear", {"normalize": True}, [{"weight": 0.5, "density": 0.6}, {"weight": 0.5, "density": 0.3},
                                          {"weight": 0.5, "density": 0.0}]),
    "dare_linear_negative": ("dare_linear", {}, [{"weight": -0.5, "density": 0.6}, {"weight": -0.5, "density": 0.3},
                                                 {"weight": 0.5, "density": 0.0}]),
    "breadcrumbs": ("breadcrumbs", {}, [{"weight": 0.5, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.5, "gamma": 0.1},
                         {"weight": 0.3, "density": 0.3, "gamma": 0.0}]),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, [{"weight": 0.5, "density": 0.6, "gamma": 0.05},
                              {"weight": 0.5, "density": 0.5, "gamma": 0.2}, {"weight": 1.0, "density": 0.3}]),
    "della_linear": ("della_linear", {}, [{"weight": 0.5, "density": 0.6, "epsilon": 0.0}, {"weight": 0.5, "density": 0.4,
                                                                          "epsilon": 0.0}]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float64)])
def test_kernel_gives_the_torch_bytes(monkeypatch, case, in_dtype, out_dtype):
    name, shared, per_model = CASES[case]
    params, model_params = resolved(get_method(name), shared, per_model)
    tensors = parents(zlib.crc32(case.encode()), len(per_model), in_dtype, specials=in_dtype != torch.float32)
    for splits in ([], [3, 17, 18, 30]):
        fused = run_chunks(name, tensors, params, model_params, splits, out_dtype)
        monkeypatch.setenv("DMERGE_NATIVE", "0")
        reference = run_chunks(name, tensors, params, model_params, splits, out_dtype)
        monkeypatch.delenv("DMERGE_NATIVE")
        same_bits(fused, reference)


def test_kernel_is_used(monkeypatch):
    """Guard for the test above: the fused path really runs (it would pass vacuously if
    both runs took the torch path)."""
    calls = []
    real = native.gta_merge
    monkeypatch.setattr(native, "gta_merge", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    name, shared, per_model = CASES["ties"]
    params, model_params = resolved(get_method(name), shared, per_model)
    run_chunks(name, parents(1, 3, torch.bfloat16, False), params, model_params, [10], torch.bfloat16)
    assert len(calls) == 2


def test_rounding_matches_torch_for_every_output_dtype(monkeypatch):
    """Results spanning every binade of the output types (subnormals, overflow, exact
    midpoints of bf16 and fp16) round exactly as dmerge.numerics.round_to does."""
    g = torch.Generator().manual_seed(3)
    n = SHAPE[0] * SHAPE[1]
    exponent = torch.randint(-40, 40, (n,), generator=g).double()
    value = torch.randn(n, generator=g, dtype=torch.float64).mul(torch.pow(2.0, exponent)).to(torch.float32)
    # exact float32 midpoints of bf16 and fp16 steps, and neighbours of the largest finite values
    value[:8] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 65520.0, 65519.0, 3.3961776e38, 6e-8, 3e-8])
    base = torch.zeros(SHAPE, dtype=torch.float32)
    model = value.reshape(SHAPE)
    name = "task_arithmetic"
    for lam in (1.0, 1 / 3, 1 + 2**-20):
        params, model_params = resolved(get_method(name), {"lambda": lam}, [{"weight": 1.0}])
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            fused = run_chunks(name, [base, model], params, model_params, [], out_dtype)
            monkeypatch.setenv("DMERGE_NATIVE", "0")
            reference = run_chunks(name, [base, model], params, model_params, [], out_dtype)
            monkeypatch.delenv("DMERGE_NATIVE")
            same_bits(fused, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_histogram_kernel_counts_like_bincount(dtype):
    tensors = parents(11, 3, dtype, specials=dtype != torch.float32)
    base, models = tensors[0], tensors[1:]
    keys = [sp.magnitude_key(m.float() - base.float()).reshape(-1) for m in models]
    # predict the buckets of the most common keys with the lowest bit set
    odd = [k[k % 2 == 1] for k in keys]
    common = [int(torch.mode(o >> sp.COARSE_SHIFT).values) for o in odd]
    # one bucket; a range of buckets with a gap (the lookup-table path); two far apart
    predicted = [[common[0]], [common[1] - 3, common[1] - 1, common[1], common[1] + 1, common[1] + 2], [1, common[2]]]
    n_bins = sp.COARSE_BINS + 5 * sp.FINE_BINS
    hists = [torch.zeros(n_bins, dtype=torch.int64) for _ in models]
    native.magnitude_histograms(base, models, hists, predicted)
    odd_fine = 0
    for k, h, p in zip(keys, hists, predicted):
        index = k >> sp.COARSE_SHIFT  # what each key's histogram index must be
        fine = index.clone()
        for j, b in enumerate(p):
            fine[index == b] = sp.COARSE_BINS + j * sp.FINE_BINS + (k[index == b] & (sp.FINE_BINS - 1))
        assert torch.equal(sp.RankSelect._bin_index(k, p), fine)  # the torch path
        assert torch.equal(h, torch.bincount(fine, minlength=n_bins))  # the kernel
        odd_fine += int(h[sp.COARSE_BINS + 1::2].sum())
    assert odd_fine > 0  # keys whose lowest bit is set were counted in fine bins


def test_compiler_failure_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.library() is None
    assert "unavailable" in caplog.text
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))
    name, shared, per_model = CASES["ties"]
    params, model_params = resolved(get_method(name), shared, per_model)
    out = run_chunks(name, parents(2, 3, torch.bfloat16, False), params, model_params, [20], torch.bfloat16)
    assert out.shape == SHAPE and out.dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("guess", ["none", "wrong"])
def test_fine_pass_kernel_gives_the_torch_bytes(monkeypatch, case, guess):
    """With the bucket prediction withheld or wrong, the second (fine) pass counts the
    threshold's bucket: by the kernel and by torch, to the same bytes."""
    real = sp.RankSelect._predict_buckets

    def predict(self, x, ids):
        found = real(self, x, ids)
        return {} if guess == "none" else {i: [b + 1 for b in bs] for i, bs in found.items()}

    monkeypatch.setattr(sp.RankSelect, "_predict_buckets", predict)
    calls = []
    real_fine = sp.RankSelect._fine_native
    monkeypatch.setattr(sp.RankSelect, "_fine_native", lambda *a: calls.append(real_fine(*a)) or calls[-1])
    name, shared, per_model = CASES[case]
    params, model_params = resolved(get_method(name), shared, per_model)
    tensors = parents(zlib.crc32(case.encode()), len(per_model), torch.bfloat16, specials=True)
    fused = run_chunks(name, tensors, params, model_params, [9, 30], torch.bfloat16)
    assert any(calls)  # the kernel counted the fine pass
    monkeypatch.setenv("DMERGE_NATIVE", "0")
    reference = run_chunks(name, tensors, params, model_params, [9, 30], torch.bfloat16)
    same_bits(fused, reference)


# linear and passthrough's scale: the weighted-sum kernel. Every source is weighted
# (linear's weight applies to all of them); passthrough has one source.
WEIGHTED_CASES = {
    "linear": ("linear", {}, [0.5, 0.3, 0.2, 0.1]),
    "linear_thirds": ("linear", {}, [1 / 3, 1 / 3, 1 / 3, 1 / 7]),
    "linear_unnormalized": ("linear", {"normalize": False}, [0.25, 0.75, -1.5, 1e-3]),
    "linear_cancelling": ("linear", {}, [1.0, -1.0, 0.5, 0.0]),
    "passthrough_scale": ("passthrough", {}, [0.37]),
    "passthrough_scale_negative": ("passthrough", {}, [-3.0]),
    "passthrough_no_scale": ("passthrough", {}, [None]),
}


def run_weighted(name: str, tensors: list[torch.Tensor], shared: dict, values: list, row_splits: list[int],
                 out_dtype: torch.dtype) -> torch.Tensor:
    method = get_method(name)
    params = {p.name: shared.get(p.name, p.default) for p in method.params}
    key = method.model_params[0].name
    model_params = [{key: v} for v in values]
    bounds = [0, *row_splits, SHAPE[0]]
    return torch.cat([method.fn(ChunkInputs(
        tensor_name="model.layers.0.mlp.up_proj.weight", tensors=[t[r0:r1] for t in tensors[:len(values)]],
        base_index=None, params=params, model_params=model_params, full_shape=SHAPE, row_start=r0, row_stop=r1,
        compute_dtype=torch.float64, out_dtype=out_dtype)) for r0, r1 in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("case", list(WEIGHTED_CASES))
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float64), (torch.float64, torch.bfloat16)])
def test_weighted_sum_kernel_gives_the_torch_bytes(monkeypatch, case, in_dtype, out_dtype):
    name, shared, values = WEIGHTED_CASES[case]
    tensors = parents(zlib.crc32(case.encode()), 3, in_dtype, specials=in_dtype != torch.float32)
    calls = []
    real = native.weighted_sum
    monkeypatch.setattr(native, "weighted_sum", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for splits in ([], [3, 17, 18, 30]):
        fused = run_weighted(name, tensors, shared, values, splits, out_dtype)
        monkeypatch.setenv("DMERGE_NATIVE", "0")
        reference = run_weighted(name, tensors, shared, values, splits, out_dtype)
        monkeypatch.delenv("DMERGE_NATIVE")
        same_bits(fused, reference)
    assert len(calls) == 6  # the kernel ran (1 + 5 chunks); the reference did not


def test_weighted_sum_rounds_products_and_sums_apart(monkeypatch):
    """Each product and each sum is rounded on its own, as the torch path does: a fused
    multiply-add would give another value here (checked in exact rational arithmetic)."""
    from fractions import Fraction

    a = torch.tensor([float.fromhex("0x1.d66b829d52152p+0")] * 19, dtype=torch.float64)  # 19: vector body and tail
    b = torch.tensor([float.fromhex("0x1.8e73ca5d82919p+0")] * 19, dtype=torch.float64)
    w = float.fromhex("0x1.5b2b5378f5c39p-1")
    x = ChunkInputs(tensor_name="t", tensors=[a, b], base_index=None, params={"normalize": False},
                    model_params=[{"weight": 1.0}, {"weight": w}], full_shape=(19,), row_start=0, row_stop=19,
                    compute_dtype=torch.float64, out_dtype=torch.float64)
    product = float(Fraction(b[0].item()) * Fraction(w))
    apart = float(Fraction(a[0].item()) + Fraction(product))
    assert apart != float(Fraction(a[0].item()) + Fraction(b[0].item()) * Fraction(w))  # a case that tells them apart
    fused = get_method("linear").fn(x)
    monkeypatch.setenv("DMERGE_NATIVE", "0")
    reference = get_method("linear").fn(x)
    assert fused.tolist() == reference.tolist() == [apart] * 19


@pytest.mark.parametrize("case", ["dare_ties", "dare_linear", "dare_linear_negative"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rescale_kernel_draws_once_and_gives_the_torch_bytes(monkeypatch, case, in_dtype):
    """A one-chunk tensor, as the engine runs it (statistics, then the merge, on the same
    inputs): the rescale statistic's kernel draws the keep-masks and the write pass uses
    its bits (MASK_BITS) instead of drawing again; statistic and output bytes are the
    torch path's. Keyed bits are drawn once per element: counted through the kernels'
    mask kinds."""
    name, shared, per_model = CASES[case]
    method = get_method(name)
    params, model_params = resolved(method, shared, per_model)
    tensors = parents(zlib.crc32(case.encode()) + 1, len(per_model), in_dtype, specials=in_dtype != torch.float32)

    def one_chunk() -> tuple[dict, torch.Tensor]:
        x = ChunkInputs(tensor_name="model.layers.0.mlp.up_proj.weight", tensors=list(tensors), base_index=0,
                        params=params, model_params=model_params, full_shape=SHAPE, row_start=0, row_stop=SHAPE[0],
                        seed=5, compute_dtype=torch.float64, out_dtype=torch.bfloat16)
        stats = {}
        for _, stat in method.statistics_for(x):
            x.stats = dict(stats)
            stats[stat.name] = stat.final(stat.combine_all([stat.chunk(x)]), x)
        x.stats = dict(stats)
        return stats, method.fn(x)

    kinds = []
    real = native.gta_merge
    monkeypatch.setattr(native, "gta_merge", lambda base, models, **k: (kinds.extend(m.mask for m in models),
                                                                         real(base, models, **k))[1])
    stats, fused = one_chunk()
    monkeypatch.setenv("DMERGE_NATIVE", "0")
    reference_stats, reference = one_chunk()
    monkeypatch.delenv("DMERGE_NATIVE")
    assert repr(stats) == repr(reference_stats) and stats["rescale"]  # repr: a NaN factor equals a NaN
    same_bits(fused, reference)
    random_models = sum(0 < p.get("density", 1) < 1 for p in per_model)
    assert kinds.count(native.MASK_BITS) == random_models and native.MASK_RANDOM not in kinds, kinds


@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                 (torch.float32, torch.bfloat16), (torch.float64, torch.float16)])
@pytest.mark.parametrize("shape", [SHAPE, (6, 1), (7,), (5, 3, 9)])
def test_slerp_kernels_give_the_torch_bytes(monkeypatch, in_dtype, out_dtype, shape):
    """slerp's Gram statistic (per-row dot products, pairwise) and its write pass (a
    weighted sum of two sources) by the kernels and by torch: the same statistics, the
    same bytes; the base listed second, and rows of odd, even and single length."""
    g = torch.Generator().manual_seed(len(shape))
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    tensors = [(a + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(in_dtype), a.to(in_dtype)]
    method = get_method("slerp")
    calls = []
    for fn in ("gram_rows", "weighted_sum"):
        real = getattr(native, fn)
        monkeypatch.setattr(native, fn, lambda *args, _real=real, _fn=fn, **k: (calls.append(_fn), _real(*args, **k))[1])
    rows = shape[0]
    bounds = [0, 2, 3, rows] if rows > 3 else [0, rows]

    def run() -> tuple[dict, torch.Tensor]:
        def chunk(r0, r1, stats):
            return ChunkInputs(tensor_name="model.layers.1.mlp.up_proj.weight", tensors=[t[r0:r1] for t in tensors],
                               base_index=1, params={"t": 0.3}, model_params=[{}, {}], full_shape=shape,
                               row_start=r0, row_stop=r1, compute_dtype=torch.float64, out_dtype=out_dtype,
                               stats=dict(stats))
        stat = method.statistics[0]
        partials = [stat.chunk(chunk(r0, r1, {})) for r0, r1 in zip(bounds, bounds[1:])]
        stats = {stat.name: stat.final(stat.combine_all(partials[::-1]), chunk(0, rows, {}))}
        return stats, torch.cat([method.fn(chunk(r0, r1, stats)) for r0, r1 in zip(bounds, bounds[1:])])

    stats, fused = run()
    assert "gram_rows" in calls and "weighted_sum" in calls
    monkeypatch.setenv("DMERGE_NATIVE", "0")
    reference_stats, reference = run()
    assert stats == reference_stats
    same_bits(fused, reference)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_kernels_count_the_nonfinite_outputs(out_dtype):
    """The kernels count the NaN/Inf they write (the engine then skips its own count):
    the same number as dmerge.numerics.count_nonfinite, overflow to infinity included."""
    from dmerge.methods.base import NONFINITE_OUTPUTS
    from dmerge.numerics import count_nonfinite

    tensors = parents(21, 3, torch.float32, specials=True)
    tensors[1][5, :9] = 3e38  # overflows bf16/fp16 when summed with weight > 1
    for name, shared, per_model in [("linear", {"normalize": False}, None), ("ties", {}, CASES["ties"][2])]:
        method = get_method(name)
        if per_model is None:
            params = {p.name: shared.get(p.name, p.default) for p in method.params}
            model_params = [{"weight": w} for w in (1.5, 1.0, 0.5, 0.25)]
        else:
            params, model_params = resolved(method, shared, per_model)
        x = ChunkInputs(tensor_name="model.layers.0.mlp.up_proj.weight", tensors=list(tensors), base_index=0,
                        params=params, model_params=model_params, full_shape=SHAPE, row_start=0, row_stop=SHAPE[0],
                        compute_dtype=torch.float64, out_dtype=out_dtype)
        for _, stat in method.statistics_for(x):
            x.stats[stat.name] = stat.final(stat.combine_all([stat.chunk(x)]), x)
        out = method.fn(x)
        assert x.scratch[NONFINITE_OUTPUTS] == count_nonfinite(out) > 0, name
