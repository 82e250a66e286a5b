"""Sparsified task-vector methods: TIES, DARE, breadcrumbs, DELLA, SCE.

* the building blocks (keyed RNG, radix select) on their own, with random
  chunkings and combine orders;
* every method against mergekit on the tiny family, with gradients and filters:
  deterministic methods element by element (differences only at exact magnitude ties of
  a top-k threshold, or where mergekit's float32 is off), random ones in distribution;
* every method against an independent float64 reference (sort-based, same tie rule,
  same keyed randomness): correctly rounded;
* output bytes independent of chunk size and worker count;
* degenerate parameters.
"""

from __future__ import annotations

import math
import random
import shutil
import sys

import pytest
import torch

from conftest import bf16_ulp, load_folder, run_merge, shard_bytes, write_recipe

from dmerge.methods import ChunkInputs, get_method
from dmerge.methods import _sparsify as sp
from dmerge.toymodels import LlamaShape, write_family

MODELS = ("ft1", "ft2", "ft3")


# ---------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def parents(family):
    return {k: load_folder(v) for k, v in family.items()}


def layer_t(name: str, n_layers: int = 4) -> float:
    if ".layers." not in name:
        return 0.0
    return int(name.split(".layers.")[1].split(".")[0]) / (n_layers - 1)


def _yaml_value(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_value(e) for e in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(e)}" for k, e in v.items()) + "}"
    return str(v).lower() if isinstance(v, bool) else str(v)


def recipe_text(family, method: str, per_model: dict, shared: dict | None = None) -> str:
    lines = [f"merge_method: {method}", f"base_model: {family['base']}", "models:"]
    for m, params in per_model.items():
        lines.append(f"  - model: {family[m]}")
        if params:
            lines.append("    parameters:")
            for k, v in params.items():
                lines.append(f"      {k}: {_yaml_value(v)}")
    if shared:
        lines.append("parameters:")
        for k, v in shared.items():
            lines.append(f"  {k}: {_yaml_value(v)}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def resolve(setting, name: str):
    """A parameter setting (scalar, gradient, filtered list) for one tensor, as mergekit."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            if cond.get("filter") is None or cond["filter"] in name:
                return resolve(cond["value"], name)
        return None
    if isinstance(setting, list):
        pos = layer_t(name) * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (pos - i0)) * setting[i0] + (pos - i0) * setting[i1]
    return setting


_RUNS: dict = {}


def ours(tmp_path_factory, text: str, *extra: str) -> dict:
    """dmerge's output for a recipe (memoized: the chunk tests reuse the default runs)."""
    key = (text, extra)
    if key not in _RUNS:
        d = tmp_path_factory.mktemp("ours")
        run_merge(write_recipe(d / "r.yml", text), str(d / "out"), *extra)
        _RUNS[key] = str(d / "out")
    return _RUNS[key]


def theirs(tmp_path_factory, text: str, seed: int | None = None) -> dict:
    from mergekit_oracle import run_mergekit

    d = tmp_path_factory.mktemp("theirs")
    return load_folder(run_mergekit(text, str(d / "out"), seed=seed))


def f32key(t: torch.Tensor) -> torch.Tensor:
    """The ranking key: magnitude rounded to float32 (as mergekit ranks)."""
    return t.float().abs().reshape(-1)


def window_mask(tau: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Reference selection: descending rank window by (float32 magnitude desc, index asc)."""
    order = torch.sort(f32key(tau), descending=True, stable=True).indices
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[order[lo:hi]] = True
    return keep.reshape(tau.shape)


def window_ties(tau: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements whose selection is ambiguous: equal in magnitude to an element across a
    window edge (mergekit keeps an arbitrary subset of such ties)."""
    key = f32key(tau)
    srt = torch.sort(key, descending=True).values
    amb = torch.zeros_like(key, dtype=torch.bool)
    for edge in (lo, hi):
        if 0 < edge < key.numel() and srt[edge - 1] == srt[edge]:
            amb |= key == srt[edge]
    return amb.reshape(tau.shape)


def consensus_merge(base, ds, ws, normalize, lam):
    """TIES sign election and disjoint mean on float64 weighted task vectors."""
    s = sum(ds)
    sign = torch.where(s >= 0, 1.0, -1.0).double()
    mixed = torch.zeros_like(base)
    div = torch.zeros_like(base)
    for d, w in zip(ds, ws):
        agree = (torch.sign(d) == sign).double()
        mixed = mixed + d * agree
        div = div + w * agree
    if normalize:
        div[div == 0] = 1
        mixed = mixed / div
    return base + lam * mixed


def linear_merge(base, ds, ws, normalize, lam):
    mixed = sum(ds)
    total = sum(ws)
    if normalize and abs(total) >= 1e-8:
        mixed = mixed / total
    return base + lam * mixed


def gta_reference(parents, name, method, per_model, shared, masks=None):
    """float64 result of a generalized-task-arithmetic method, plus the ambiguous elements.

    ``masks(tau, model, params)`` may supply a random method's keep-mask.
    """
    consensus = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    defaults = {"ties": (True, False), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
                "dare_ties": (False, True), "dare_linear": (False, True), "della": (True, True),
                "della_linear": (False, True), "task_arithmetic": (False, False)}[method]
    normalize = shared.get("normalize", defaults[0])
    rescale = shared.get("rescale", defaults[1])
    lam = shared.get("lambda", 1.0)
    base = parents["base"][name].double()
    ambiguous = torch.zeros_like(base, dtype=torch.bool)
    ds, ws = [], []
    for m, params in per_model.items():
        w = resolve(params["weight"], name)
        d = resolve(params.get("density", 1.0), name)
        tau = parents[m][name].double() - base
        n = tau.numel()
        keep = None
        if d < 1:
            if method in ("ties",):
                lo, hi = (0, 0) if d <= 0 else (0, max(1, int(d * n)))
            elif method.startswith("breadcrumbs"):
                g = resolve(params.get("gamma", 0.01), name)
                keep_n, n_top = int(d * n), int(g * n)
                n_bot = max(0, n - keep_n - n_top)
                lo, hi = n - n_bot - keep_n, n - n_bot
            else:
                lo = hi = None
            if lo is not None:
                keep = window_mask(tau, lo, hi)
                ambiguous |= window_ties(tau, lo, hi)
            else:
                keep = masks(tau, m, {"density": d, "epsilon": resolve(params.get("epsilon", 0.15), name)})
            kept = tau * keep
            if rescale:
                before, after = tau.abs().sum(), kept.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            tau = kept
        ds.append(tau * w)
        ws.append(w)
    merge = consensus_merge if consensus else linear_merge
    ambiguous = {"tie": ambiguous}
    if consensus:
        # the elected sign of a sum that is zero up to float32 rounding is a coin toss
        # between float32 and float64 arithmetic (e.g. 0.2 * a - 0.3 * b with 2a = 3b)
        ambiguous["sign"] = sum(ds).abs() <= 2.0**-20 * sum(d.abs() for d in ds)
    return merge(base, ds, ws, normalize, lam), ambiguous


def assert_correctly_rounded(out: dict, ref: dict, label: str = "") -> None:
    """dmerge's bf16 output is the float64 reference rounded (half an ulp + slack)."""
    bad = total = 0
    for name, r in ref.items():
        o = out[name].double()
        err = (o - r).abs()
        half = 0.5 * torch.minimum(bf16_ulp(o), bf16_ulp(r))
        bad += int((err > half + 1e-12 * r.abs() + 1e-30).sum())
        total += r.numel()
    assert bad <= 1e-5 * total, f"{label}: {bad} of {total} elements are not the rounded float64 reference"


def compare_deterministic(our: dict, their: dict, ref: dict, ambiguous: dict) -> dict:
    """Elements further than one bf16 step from mergekit must be ambiguous (a magnitude
    tie across a top-k edge, or a sign election on a sum that is zero up to float32
    rounding), or dmerge must be the correctly rounded one (mergekit's float32 arithmetic
    off, e.g. by cancellation). Returns how many elements fall in each case."""
    assert our.keys() == their.keys()
    counts = {"elements": 0, "differ": 0, "tie": 0, "sign": 0, "mergekit_off": 0}
    for name in our:
        a, b = our[name].double(), their[name].double()
        far = (a - b).abs() > bf16_ulp(torch.maximum(a.abs(), b.abs())) * 1.0001
        counts["elements"] += a.numel()
        counts["differ"] += int(far.sum())
        if not bool(far.any()):
            continue
        for kind, mask in ambiguous[name].items():
            counts[kind] += int((far & mask).sum())
            far &= ~mask
        if bool(far.any()):
            r = ref[name][far]
            err = (a[far] - r).abs()
            assert bool((err <= 0.5 * bf16_ulp(a[far]) + 1e-12 * r.abs() + 1e-30).all()), (
                f"{name}: {int(far.sum())} elements differ from mergekit without ambiguity, and dmerge is not the rounded reference")
            counts["mergekit_off"] += int(far.sum())
    assert counts["mergekit_off"] <= 1e-3 * counts["elements"], counts
    return counts


# ---------------------------------------------------------------------------------------
# building blocks


def test_keyed_bits_match_splitmix64_reference():
    for key in (0, 12345, (1 << 64) - 1, sp.stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)):
        for start in (0, 1, 1000, 1001, (1 << 40) + 3, (1 << 62)):
            bits = sp.keyed_bits(key, start, 65)
            expect = torch.tensor([sp.keyed_bits_reference(key, start + j) for j in range(65)], dtype=torch.int64)
            assert torch.equal(bits, expect)
    u = sp.keyed_uniform(sp.stream_key(0, "t", 1), 3, 1 << 16)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    # any sub-range gives the same numbers (chunk invariance)
    whole = sp.keyed_bits(99, 10, 1000)
    assert torch.equal(torch.cat([sp.keyed_bits(99, 10, 333), sp.keyed_bits(99, 343, 667)]), whole)
    # streams of different models, tensors and seeds are different
    keys = {sp.stream_key(s, n, m) for s in (0, 1) for n in ("a", "b") for m in (0, 1, 2)}
    assert len(keys) == 12


def test_magnitude_key_same_from_float32_and_float64_differences():
    """The selection passes read fp32/bf16/fp16 parents as float32; the merge computes
    the task vector in float64. Their float32 magnitude keys must agree, including for
    operands whose exponents are far apart (where the float64 difference is rounded)."""
    g = torch.Generator().manual_seed(4)
    n = 200_000
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    b = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    b[::3] = x[::3] * (1 + torch.randn(n, generator=g)[::3] * 1e-3)  # near-cancellation too
    b = b.float()
    assert torch.equal(sp.magnitude_key(x.double() - b.double()), sp.magnitude_key(x - b))


def _chunked_masks(sparsifier, base, model, params, model_params, row_splits, seed=0):
    """Run a sparsifier's statistics and masks as the engine would, chunk by chunk (inputs
    as stored, bf16 here), with partials combined in a shuffled order."""
    shape = tuple(base.shape)
    bounds = [0, *row_splits, shape[0]]
    x_full = model.to(torch.bfloat16)
    b_full = base.to(torch.bfloat16)

    def chunk(r0, r1):
        return ChunkInputs(tensor_name="t", tensors=[b_full[r0:r1].clone(), x_full[r0:r1].clone()], base_index=0,
                           params=params, model_params=model_params, full_shape=shape, row_start=r0,
                           row_stop=r1, seed=seed, compute_dtype=torch.float64)

    stats: dict = {}
    rnd = random.Random(len(row_splits))
    for stat in sparsifier.statistics():
        ctx = ChunkInputs(tensor_name="t", tensors=[], base_index=0, params=params, model_params=model_params,
                          full_shape=shape, stats=dict(stats))
        if not stat.applies(ctx):
            continue
        partials = []
        for r0, r1 in zip(bounds, bounds[1:]):
            x = chunk(r0, r1)
            x.stats = dict(stats)
            partials.append(stat.chunk(x))
        rnd.shuffle(partials)
        stats[stat.name] = stat.final(stat.combine_all(partials), ctx)
    masks = []
    for r0, r1 in zip(bounds, bounds[1:]):
        x = chunk(r0, r1)
        x.stats = dict(stats)
        masker = sparsifier.masker(x, 1)
        for xb in sp.blocks(x):
            tv_b = xb.tensors[1] - xb.base
            m = masker(xb, tv_b)
            masks.append(torch.full(tv_b.shape, m == sp.ALL) if isinstance(m, str) else m)
    return torch.cat(masks), stats


@pytest.mark.parametrize("kind", ["ties", "breadcrumbs"])
def test_radix_select_exact_under_any_chunking(kind):
    g = torch.Generator().manual_seed(1)
    rows, cols = 23, 19
    # bf16 parents (as the engine sees them, widened): heavy ties, as bf16 deltas have
    base = torch.randn(rows, cols, generator=g).to(torch.bfloat16).double()
    tv = torch.randint(-6, 7, (rows, cols), generator=g).double() * 0.25
    tv[::5] += torch.randn(cols, generator=g, dtype=torch.float64) * 1e-3
    tv = (base + tv).to(torch.bfloat16).double() - base
    n = rows * cols
    rnd = random.Random(5)
    for density, gamma in ((0.5, 0.0), (0.3, 0.1), (0.07, 0.2), (0.9, 0.3), (0.0005, 0.0)):
        if kind == "ties":
            sparsifier = sp.MagnitudeTopK()
            lo, hi = 0, max(1, int(density * n))
        else:
            sparsifier = sp.MagnitudeOutliers()
            keep_n, n_top = int(density * n), int(gamma * n)
            n_bot = max(0, n - keep_n - n_top)
            lo, hi = n - n_bot - keep_n, n - n_bot
        expect = window_mask(tv, lo, hi)
        mp = [{"density": None, "gamma": None}, {"density": density, "gamma": gamma}]
        for splits in ([], [1], sorted(rnd.sample(range(1, rows), 5)), list(range(1, rows))):
            mask, _ = _chunked_masks(sparsifier, base, base + tv, {}, mp, splits)
            assert torch.equal(mask, expect), (density, gamma, splits)
            assert int(mask.sum()) == hi - lo


@pytest.mark.parametrize("sparsifier", [sp.RandomDrop(), sp.DellaMagprune()])
def test_random_masks_independent_of_chunking(sparsifier):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(16, 40, generator=g, dtype=torch.float64)
    tv = torch.randn(16, 40, generator=g, dtype=torch.float64)
    mp = [{"density": None, "epsilon": None}, {"density": 0.4, "epsilon": 0.1}]
    whole, _ = _chunked_masks(sparsifier, base, base + tv, {}, mp, [], seed=11)
    split, _ = _chunked_masks(sparsifier, base, base + tv, {}, mp, [3, 4, 9], seed=11)
    other_seed, _ = _chunked_masks(sparsifier, base, base + tv, {}, mp, [], seed=12)
    assert torch.equal(whole, split) and not torch.equal(whole, other_seed)
    assert abs(float(whole.double().mean()) - 0.4) < 0.08


# ---------------------------------------------------------------------------------------
# against mergekit and the float64 reference: deterministic methods

DETERMINISTIC = {
    "ties": ({
        "ft1": {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
        "ft2": {"weight": [{"filter": "mlp", "value": -0.3}, {"value": 0.5}], "density": 0.5},
        "ft3": {"weight": 0.4, "density": [0.2, 0.9]},
    }, {}),
    "ties_rescaled": ({
        "ft1": {"weight": 0.7, "density": 0.4},
        "ft2": {"weight": [0.1, 0.6], "density": [{"filter": "self_attn", "value": 0.15}, {"value": 0.45}]},
    }, {"rescale": True, "normalize": False, "lambda": 0.8}),
    "breadcrumbs": ({
        "ft1": {"weight": [0.6, 0.3], "density": 0.5, "gamma": 0.05},
        "ft2": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.35}, {"value": 0.7}], "gamma": [0.0, 0.1]},
        "ft3": {"weight": -0.2, "density": 0.9, "gamma": 0.2},
    }, {"lambda": 1.1}),
    "breadcrumbs_ties": ({
        "ft1": {"weight": 0.6, "density": [0.4, 0.8], "gamma": 0.01},
        "ft2": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.4}], "density": 0.5, "gamma": 0.03},
        "ft3": {"weight": 0.3, "density": 0.6, "gamma": 0.0001},
    }, {"normalize": True}),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_deterministic_agree_with_mergekit(family, parents, tmp_path_factory, case):
    method = case.removesuffix("_rescaled")
    per_model, shared = DETERMINISTIC[case]
    text = recipe_text(family, method, per_model, shared)
    our = load_folder(ours(tmp_path_factory, text))
    their = theirs(tmp_path_factory, text)
    ref, amb = {}, {}
    for name in our:
        ref[name], amb[name] = gta_reference(parents, name, method, per_model, shared)
    assert_correctly_rounded(our, ref, case)
    counts = compare_deterministic(our, their, ref, amb)
    print(case, counts)


def _variance_selection(tvs: list[torch.Tensor], topk: float):
    var = torch.var(torch.stack(tvs), dim=0, unbiased=False)
    key = f32key(var)
    nonzero = int((key != 0).sum())
    k = int(nonzero * topk)
    keep = window_mask(var, 0, k)
    # mergekit's float32 variance may differ from ours by an ulp or two: ranks near the
    # threshold (within 4 float32 steps) are ambiguous
    srt = torch.sort(key, descending=True).values
    amb = torch.zeros_like(key, dtype=torch.bool)
    if 0 < k < key.numel():
        thr = srt[k - 1].view(torch.int32)
        amb = (key.view(torch.int32) - thr).abs() <= 4
    return keep, amb.reshape(var.shape)


def sce_reference(parents, name, models, topk):
    base = parents["base"][name].double()
    tvs = [parents[m][name].double() - base for m in models]
    amb = torch.zeros_like(base, dtype=torch.bool)
    if topk < 1:
        if topk <= 0:
            keep = torch.zeros_like(base, dtype=torch.bool)
        else:
            keep, amb = _variance_selection(tvs, topk)
        tvs = [t * keep for t in tvs]
    s = sum(tvs)
    sign = torch.where(s >= 0, 1.0, -1.0).double()
    ms = [float(t.square().mean()) for t in tvs]
    total = sum(ms)
    cs = [1 / len(ms)] * len(ms) if abs(total) < 1e-6 else [m / total for m in ms]
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for t, c in zip(tvs, cs):
        agree = (torch.sign(t) == sign).double() * c
        num += t * agree
        den += agree
    sign_amb = s.abs() <= 2.0**-20 * sum(t.abs() for t in tvs)
    return base + num / den.clamp(min=1e-6), {"tie": amb, "sign": sign_amb}


@pytest.mark.parametrize("topk", [0.35, 1.0])
def test_sce_agrees_with_mergekit(family, parents, tmp_path_factory, topk):
    text = recipe_text(family, "sce", {m: {} for m in MODELS}, {"select_topk": topk})
    our = load_folder(ours(tmp_path_factory, text))
    their = theirs(tmp_path_factory, text)
    ref, amb = {}, {}
    for name in our:
        ref[name], amb[name] = sce_reference(parents, name, MODELS, topk)
    assert_correctly_rounded(our, ref, "sce")
    print("sce", topk, compare_deterministic(our, their, ref, amb))


# ---------------------------------------------------------------------------------------
# random methods: exact against the reference with our keyed randomness, in distribution
# against mergekit

RANDOM = {
    "dare_ties": ({
        "ft1": {"weight": [0.3, 0.6], "density": 0.4},
        "ft2": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.25}, {"value": 0.6}]},
        "ft3": {"weight": 0.4, "density": 0.5},
    }, {}),
    "dare_linear": ({
        "ft1": {"weight": 0.5, "density": 0.3},
        "ft2": {"weight": [0.2, 0.4], "density": 0.7},
    }, {"lambda": 0.9}),
    "della": ({
        "ft1": {"weight": 0.5, "density": 0.4, "epsilon": 0.2},
        "ft2": {"weight": 0.3, "density": [0.3, 0.6], "epsilon": 0.1},
        "ft3": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}], "density": 0.5, "epsilon": 0.25},
    }, {}),
    "della_linear": ({
        "ft1": {"weight": 0.6, "density": 0.3, "epsilon": 0.15},
        "ft2": {"weight": 0.4, "density": 0.6, "epsilon": 0.3},
    }, {"normalize": True}),
}
SEED = 17


def keyed_masks(name: str, method: str, seed: int = SEED):
    """Our keyed Bernoulli masks, rebuilt independently of the engine (same generator)."""

    def masks(tau, model, params):
        index = {"base": 0, "ft1": 1, "ft2": 2, "ft3": 3}[model] - 1  # sources in recipe order: ft1.. then base
        key = sp.stream_key(seed, name, index)
        u = sp.keyed_uniform(key, 0, tau.numel()).reshape(tau.shape)  # exact: 32-bit numbers
        d, eps = params["density"], params["epsilon"]
        if method.startswith("dare") or eps == 0:
            return u < d
        mag = tau.float().abs() if tau.dim() >= 2 else tau.float().abs().unsqueeze(0)  # float32 keys, ties by column
        cols = mag.shape[1]
        order = torch.sort(mag, dim=1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols).expand_as(order)).double()
        p = d - eps + ranks * (2 * eps / (cols - 1)) if cols > 1 else torch.full_like(mag, d)
        return u < p.reshape(tau.shape)

    return masks


@pytest.mark.parametrize("method", list(RANDOM))
def test_random_methods_match_keyed_reference(family, parents, tmp_path_factory, method):
    per_model, shared = RANDOM[method]
    text = recipe_text(family, method, per_model, shared)
    our = load_folder(ours(tmp_path_factory, text, "--random-seed", str(SEED)))
    ref = {name: gta_reference(parents, name, method, per_model, shared, keyed_masks(name, method))[0] for name in our}
    assert_correctly_rounded(our, ref, method)


def _delta_stats(out: dict, parents: dict, names) -> dict:
    changed = total = 0
    l1 = l2 = mean = 0.0
    for n in names:
        d = out[n].double() - parents["base"][n].double()
        changed += int((d != 0).sum())
        total += d.numel()
        l1 += float(d.abs().sum())
        l2 += float(d.square().sum())
        mean += float(d.sum())
    return {"changed": changed / total, "l1": l1 / total, "rms": math.sqrt(l2 / total), "mean": mean / total, "n": total}


@pytest.mark.parametrize("method", list(RANDOM))
def test_random_methods_agree_with_mergekit_in_distribution(family, parents, tmp_path_factory, method):
    per_model, shared = RANDOM[method]
    text = recipe_text(family, method, per_model, shared)
    our = load_folder(ours(tmp_path_factory, text, "--random-seed", str(SEED)))
    their = theirs(tmp_path_factory, text, seed=SEED)
    names = [n for n in our if our[n].dim() == 2]
    a, b = _delta_stats(our, parents, names), _delta_stats(their, parents, names)
    sigma = math.sqrt(a["changed"] * (1 - a["changed"]) / a["n"])
    assert abs(a["changed"] - b["changed"]) < 6 * sigma * math.sqrt(2) + 1e-3, (a, b)
    assert abs(a["l1"] / b["l1"] - 1) < 0.02, (a, b)
    assert abs(a["rms"] / b["rms"] - 1) < 0.02, (a, b)
    assert abs(a["mean"] - b["mean"]) < 0.02 * a["rms"], (a, b)
    print(method, "changed", round(a["changed"], 4), round(b["changed"], 4), "l1 ratio", round(a["l1"] / b["l1"], 4))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_single_model_keep_rate_and_rescale_like_mergekit(family, parents, tmp_path_factory, method):
    """One task vector, weight 1: the kept fraction, the rescale factor (l1 kept) and,
    for DELLA, the preference for large magnitudes match mergekit's."""
    params = {"weight": 1.0, "density": 0.3}
    if method == "della_linear":
        params["epsilon"] = 0.25
    text = recipe_text(family, method, {"ft1": params})
    our = load_folder(ours(tmp_path_factory, text, "--random-seed", str(SEED)))
    their = theirs(tmp_path_factory, text, seed=SEED)
    result = {}
    for label, out in (("ours", our), ("theirs", their)):
        kept = total = 0
        tau_l1 = out_l1 = kept_mag = 0.0
        for n in (n for n in out if out[n].dim() == 2):
            tau = parents["ft1"][n].double() - parents["base"][n].double()
            d = out[n].double() - parents["base"][n].double()
            k = (d != 0) & (tau != 0)
            kept += int(k.sum())
            total += int((tau != 0).sum())
            tau_l1 += float(tau.abs().sum())
            out_l1 += float(d.abs().sum())
            kept_mag += float(tau.abs()[k].sum())
        result[label] = (kept / total, out_l1 / tau_l1, kept_mag / kept, total)
    (fa, ra, ma, n), (fb, rb, mb, _) = result["ours"], result["theirs"]
    assert abs(fa - fb) < 6 * math.sqrt(0.3 * 0.7 / n) * math.sqrt(2) + 2e-3, result
    assert abs(ra - 1) < 0.02 and abs(ra - rb) < 0.02, result
    assert abs(ma / mb - 1) < 0.02, result
    print(method, result)


# ---------------------------------------------------------------------------------------
# chunking and workers

ALL_CASES = {**DETERMINISTIC, **RANDOM, "sce": ({m: {} for m in MODELS}, {"select_topk": 0.35})}
MINI = LlamaShape(hidden=64, layers=1, intermediate=96, heads=4, kv_heads=2, vocab=64)


@pytest.fixture(scope="module")
def mini_family(tmp_path_factory) -> dict[str, str]:
    """One decoder layer: the many-chunk runs stay quick."""
    folders = write_family(str(tmp_path_factory.mktemp("mini")), MINI, n_fine_tunes=3, seed=5)
    return dict(zip(["base", "ft1", "ft2", "ft3"], folders))


@pytest.fixture(scope="module")
def mini_parents(mini_family):
    return {k: load_folder(v) for k, v in mini_family.items()}


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_bytes_independent_of_chunks_and_workers(mini_family, tmp_path_factory, case):
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    method = case.removesuffix("_rescaled")
    per_model, shared = ALL_CASES[case]
    text = recipe_text(mini_family, method, per_model, shared)
    seed = ("--random-seed", str(SEED)) if case in RANDOM else ()
    recipe = load_recipe(text, is_text=True)
    plans = {cb: build_plan(recipe, chunk_bytes=cb) for cb in (6 << 10, 12 << 10, 1 << 20, 128 << 20)}
    assert sum(t.n_chunks >= 4 for t in plans[6 << 10].tensors) >= 7
    assert sum(t.n_chunks >= 2 for t in plans[12 << 10].tensors) >= 7
    # these tensors are below 1M: that budget plans exactly the default's single chunks
    assert [t.rows_per_chunk for t in plans[1 << 20].tensors] == [t.rows_per_chunk for t in plans[128 << 20].tensors]
    default = shard_bytes(ours(tmp_path_factory, text, *seed))
    for extra in (("--chunk-size", "12K"), ("--chunk-size", "6K", "--workers", "3", "--threads-per-worker", "1")):
        other = shard_bytes(ours(tmp_path_factory, text, *seed, *extra))
        assert other == default, (case, extra)


def _exact_buckets(select, x, ids):
    """What a perfect prediction would say for a chunk that is the whole tensor."""
    import dataclasses

    from dmerge.numerics import widen

    whole = dataclasses.replace(x, tensors=[widen(t, torch.float32) for t in x.tensors], compute_dtype=None)
    n = math.prod(x.full_shape)
    out = {}
    for i, keys in select.keys(whole, ids).items():
        lo, hi = select.window(x, i, n, 0)
        if lo >= hi or (lo == 0 and hi >= n):
            continue
        ordered = torch.sort(keys.reshape(-1), descending=True).values
        out[i] = sorted({int(ordered[r]) >> sp.COARSE_SHIFT for r in sp._target_ranks(lo, hi)})
    return out


@pytest.mark.parametrize("case", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("guess, chunking", [("exact", ()), ("wrong", ()), ("none", ("--chunk-size", "12K")),
                                             ("wrong", ("--chunk-size", "12K")), ("alternate", ("--chunk-size", "6K"))])
def test_bucket_prediction_only_saves_work(mini_family, mini_parents, tmp_path_factory, monkeypatch, case, guess,
                                          chunking):
    """The coarse pass also counts the fine histogram of the bucket a sample predicts.
    Right, the fine pass reads nothing; absent or wrong, the fine pass counts it; the
    bytes are the same every way."""
    from dmerge.methods._sparsify import RankSelect

    per_model, shared = ALL_CASES[case]
    text = recipe_text(mini_family, case, per_model, shared)
    reference = shard_bytes(ours(tmp_path_factory, text, *chunking))
    real_blocks = sp.blocks
    real_native = RankSelect._count_native
    passes = {"_fine_chunk": 0, "_coarse_chunk": 0}

    def blocks(x, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_name
        if caller in passes:
            passes[caller] += 1
        return real_blocks(x, *args, **kwargs)

    def count_native(self, *args):  # either pass may count with the fused kernel instead
        counted = real_native(self, *args)
        caller = sys._getframe(1).f_code.co_name
        passes["_fine_chunk" if caller == "_fine_native" else "_coarse_chunk"] += counted
        return counted

    sampled = RankSelect._predict_buckets

    def predict(self, x, ids):
        if guess == "none":
            return {}
        # whole tensors: the true buckets; chunks: the sample's guess (possibly none)
        found = _exact_buckets(self, x, ids) if not chunking else sampled(self, x, ids)
        if guess == "alternate":  # every other chunk knows the true buckets: known and counted chunks mix
            if x.row_start // max(1, x.row_stop - x.row_start) % 2:
                return {}
            import dataclasses

            # the sources are the recipe's models in order, then the base
            whole = [mini_parents[m][x.tensor_name] for m in (*per_model, "base")]
            return _exact_buckets(self, dataclasses.replace(x, tensors=whole, row_start=0,
                                                            row_stop=whole[0].shape[0] if whole[0].dim() else 1), ids)
        return found if guess == "exact" else {i: [b + 1 for b in bs] for i, bs in found.items()}

    monkeypatch.setattr(sp, "blocks", blocks)
    monkeypatch.setattr(RankSelect, "_predict_buckets", predict)
    monkeypatch.setattr(RankSelect, "_count_native", count_native)
    d = tmp_path_factory.mktemp("guess")
    run_merge(write_recipe(d / "r.yml", text), str(d / "out"), *chunking)
    assert passes["_coarse_chunk"] > 0
    if guess == "alternate":
        assert 0 < passes["_fine_chunk"] < passes["_coarse_chunk"]
    else:
        assert (passes["_fine_chunk"] == 0) == (guess == "exact")
    assert shard_bytes(str(d / "out")) == reference


def test_bucket_prediction_hits_on_smooth_and_tied_keys():
    """A prediction is the bucket of the exact k-th key: made for keys with many ties (bf16
    task vectors), withheld where the sample cannot tell the bucket (continuous keys)."""
    from dmerge.methods._sparsify import COARSE_SHIFT, MagnitudeTopK

    g = torch.Generator().manual_seed(11)
    base = torch.randn(512, 256, generator=g) * 0.02
    # a bf16 fine-tune moves most weights by a few bf16 steps (about 1e-4 at 0.02)
    for parents, step in ((torch.bfloat16, 3e-4), (torch.float32, 4e-3)):
        b = base.to(parents)
        ft = (base + step * torch.randn(512, 256, generator=g)).to(parents)
        x = ChunkInputs(tensor_name="t", tensors=[b, ft], base_index=0, params={}, model_params=[{}, {"density": 0.3}],
                        full_shape=(512, 256), row_start=0, row_stop=512, compute_dtype=torch.float64)
        sparsifier = MagnitudeTopK()
        predicted = sparsifier.select._predict_buckets(x, [1])
        keys = (ft.float() - b.float()).abs().reshape(-1).view(torch.int32)
        k = int(0.3 * keys.numel())
        exact = int(torch.sort(keys, descending=True).values[k - 1]) >> COARSE_SHIFT
        if parents == torch.bfloat16:  # many ties: the bucket is certain
            assert predicted == {1: [exact]}
        else:  # continuous keys: no guess unless a sure one
            assert predicted in ({}, {1: [exact]})


# ---------------------------------------------------------------------------------------
# degenerate parameters


def _base_bytes_equal(out_dir: str, parents) -> None:
    out = load_folder(out_dir)
    for n, t in out.items():
        assert torch.equal(t.view(torch.int16), parents["base"][n].view(torch.int16)), n


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                                    "della", "della_linear"])
def test_density_zero_gives_base(mini_family, mini_parents, tmp_path_factory, method):
    text = recipe_text(mini_family, method, {m: {"weight": 0.5, "density": 0.0} for m in MODELS[:2]})
    _base_bytes_equal(ours(tmp_path_factory, text), mini_parents)


@pytest.mark.parametrize("method", ["dare_linear", "breadcrumbs", "della_linear"])
def test_density_one_is_task_arithmetic(mini_family, tmp_path_factory, method):
    per_model = {"ft1": {"weight": 0.6}, "ft2": {"weight": [0.1, 0.5], "density": 1.0}}
    a = shard_bytes(ours(tmp_path_factory, recipe_text(mini_family, method, per_model, {"rescale": True})))
    b = shard_bytes(ours(tmp_path_factory, recipe_text(mini_family, "task_arithmetic", per_model)))
    assert a == b


def test_ties_density_one_is_sign_consensus_only(mini_family, mini_parents, tmp_path_factory):
    per_model = {m: {"weight": w} for m, w in zip(MODELS, (0.5, -0.3, 0.4))}
    text = recipe_text(mini_family, "ties", per_model)
    our = load_folder(ours(tmp_path_factory, text))
    ref = {n: gta_reference(mini_parents, n, "ties", per_model, {})[0] for n in our}
    assert_correctly_rounded(our, ref, "ties density 1")


def test_zero_task_vectors_and_single_model_give_base(mini_family, mini_parents, tmp_path_factory):
    zero = str(tmp_path_factory.mktemp("zero") / "base_copy")
    shutil.copytree(mini_family["base"], zero)
    fam = {**mini_family, "zero": zero}
    cases = [
        ("ties", {"zero": {"weight": 1.0, "density": 0.5}}, {}),
        ("breadcrumbs_ties", {"zero": {"weight": 1.0, "density": 0.5, "gamma": 0.1}}, {}),
        ("dare_ties", {"zero": {"weight": 1.0, "density": 0.5}}, {}),
        ("della", {"zero": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}, {}),
        ("sce", {"zero": {}, "base": {}}, {"select_topk": 0.5}),
        ("sce", {"zero": {}}, {}),
        ("sce", {"ft1": {}}, {"select_topk": 0.5}),  # one model: no variance, nothing selected
        ("sce", {"ft1": {}, "ft2": {}}, {"select_topk": 0.0}),
        ("ties", {"base": {"weight": 1.0, "density": 0.5}}, {}),  # only the base model
    ]
    for method, per_model, shared in cases:
        text = recipe_text(fam, method, per_model, shared)
        chunked = ("--chunk-size", "16K") if method in ("dare_ties", "della", "sce") else ()
        _base_bytes_equal(ours(tmp_path_factory, text, *chunked), mini_parents)


def test_breadcrumbs_gamma_rounding_to_zero_keeps_the_top(mini_family, mini_parents, tmp_path_factory):
    """gamma * n < 1 removes no outliers: the largest density * n magnitudes are kept
    (mergekit once kept nothing there, through an empty slice)."""
    per_model = {"ft1": {"weight": 1.0, "density": 0.4, "gamma": 1e-6}}
    text = recipe_text(mini_family, "breadcrumbs", per_model)
    our = load_folder(ours(tmp_path_factory, text))
    ref = {n: gta_reference(mini_parents, n, "ties", {"ft1": {"weight": 1.0, "density": 0.4}},
                            {"normalize": False})[0] for n in our}
    assert_correctly_rounded(our, ref, "breadcrumbs gamma 0")
    assert any(not torch.equal(our[n], mini_parents["base"][n]) for n in our)


@pytest.mark.parametrize("case", ["ties_rescaled", "breadcrumbs", "sce"])
def test_float32_compute_close_to_float64(mini_family, tmp_path_factory, case):
    method = case.removesuffix("_rescaled")
    per_model, shared = ALL_CASES[case]
    text = recipe_text(mini_family, method, per_model, shared)
    a = load_folder(ours(tmp_path_factory, text))
    b = load_folder(ours(tmp_path_factory, text, "--compute-dtype", "float32", "--chunk-size", "16K"))
    far = total = 0
    for n in a:
        x, y = a[n].double(), b[n].double()
        far += int(((x - y).abs() > bf16_ulp(torch.maximum(x.abs(), y.abs())) * 1.0001).sum())
        total += x.numel()
    assert far <= 1e-3 * total, (far, total)


def test_della_epsilon_zero_is_dare(mini_family, tmp_path_factory):
    per_model = {"ft1": {"weight": 0.6, "density": 0.4}, "ft2": {"weight": 0.5, "density": 0.7}}
    with_eps = {m: {**p, "epsilon": 0.0} for m, p in per_model.items()}
    a = shard_bytes(ours(tmp_path_factory, recipe_text(mini_family, "della_linear", with_eps), "--random-seed", "3"))
    b = shard_bytes(ours(tmp_path_factory, recipe_text(mini_family, "dare_linear", per_model), "--random-seed", "3"))
    c = shard_bytes(ours(tmp_path_factory, recipe_text(mini_family, "dare_linear", per_model), "--random-seed", "4"))
    assert a == b and a != c


def test_della_bad_epsilon_is_refused_before_merging(mini_family, tmp_path):
    from click.testing import CliRunner

    from dmerge.cli import main

    text = recipe_text(mini_family, "della", {"ft1": {"weight": 1.0, "density": 0.2, "epsilon": 0.3}})
    result = CliRunner().invoke(main, ["run", write_recipe(tmp_path / "r.yml", text), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and "density - epsilon > 0" in result.output
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_methods_registered_with_mergekit_defaults():
    expect = {
        "ties": (True, False), "dare_ties": (False, True), "dare_linear": (False, True),
        "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False), "della": (True, True),
        "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expect.items():
        m = get_method(name)
        assert m.requires_base and m.param("normalize").default is normalize and m.param("rescale").default is rescale
        assert m.param("weight").required and m.param("density").default == 1.0
    assert get_method("breadcrumbs").param("gamma").default == 0.01
    assert get_method("della").param("epsilon").default == 0.15
    sce = get_method("sce")
    assert sce.param("select_topk").default == 1.0 and sce.param("weight") is None


# ---------------------------------------------------------------------------------------
# engine-free: the methods' statistics and chunks driven directly, on CPU and on CUDA


def _method_params(name: str) -> tuple[dict, list[dict]]:
    m = get_method(name)
    params = {p.name: p.default for p in m.params}
    if name == "sce":
        params["select_topk"] = 0.4
    model_params = []
    for i, (w, d) in enumerate(((0.5, 0.4), (-0.3, 0.6), (0.4, 0.3))):
        mp = {p.name: p.default for p in m.model_params}
        mp.update({k: v for k, v in (("weight", w), ("density", d), ("gamma", 0.05), ("epsilon", 0.1)) if k in mp})
        model_params.append(mp)
    model_params.append({p.name: None for p in m.model_params})  # the base
    if name in ("ties", "dare_ties"):
        params["rescale"] = True
    return params, model_params


def _emulate(name: str, tensors: list, device: str, row_splits: list, seed: int = 5) -> torch.Tensor:
    """What the engine does for one tensor, chunk by chunk; returns the bf16 result."""
    from dmerge.numerics import round_to

    method = get_method(name)
    params, model_params = _method_params(name)
    shape = tuple(tensors[0].shape)
    bounds = [0, *row_splits, shape[0]]

    def chunk(r0, r1, stats):  # inputs as stored (raw_inputs), as the engine gives them
        return ChunkInputs(tensor_name="w", tensors=[t[r0:r1].to(device, copy=True) for t in tensors], base_index=3,
                           params=params, model_params=model_params, full_shape=shape, row_start=r0,
                           row_stop=r1, stats=dict(stats), seed=seed, compute_dtype=torch.float64)

    stats: dict = {}
    for stat in method.statistics:
        ctx = ChunkInputs(tensor_name="w", tensors=[], base_index=3, params=params, model_params=model_params,
                          full_shape=shape, stats=dict(stats), seed=seed)
        if not stat.applies(ctx):
            continue
        partials = [stat.chunk(chunk(r0, r1, stats)) for r0, r1 in zip(bounds, bounds[1:])]
        stats[stat.name] = stat.final(stat.combine_all(partials[::-1]), ctx)
    outs = [round_to(method.fn(chunk(r0, r1, stats)), torch.bfloat16).cpu() for r0, r1 in zip(bounds, bounds[1:])]
    return torch.cat(outs)


ENGINE_FREE = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
               "task_arithmetic"]


def _engine_free_inputs():
    g = torch.Generator().manual_seed(9)
    base = (0.02 * torch.randn(96, 200, generator=g)).to(torch.bfloat16)
    fts = [(base.float() + 0.005 * torch.randn(96, 200, generator=g)).to(torch.bfloat16) for _ in range(3)]
    return [*fts, base]  # bf16, as stored


@pytest.mark.parametrize("name", ENGINE_FREE)
def test_engine_free_chunking(name):
    tensors = _engine_free_inputs()
    whole = _emulate(name, tensors, "cpu", [])
    for splits in ([1], [5, 40, 41, 90]):
        assert torch.equal(_emulate(name, tensors, "cpu", splits).view(torch.int16), whole.view(torch.int16)), splits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ENGINE_FREE)
def test_cuda_gives_the_cpu_bytes(name):
    tensors = _engine_free_inputs()
    cpu = _emulate(name, tensors, "cpu", [])
    for splits in ([], [7, 50]):
        assert torch.equal(_emulate(name, tensors, "cuda", splits).view(torch.int16), cpu.view(torch.int16)), splits
