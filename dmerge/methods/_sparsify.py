"""Building blocks of the sparsifying methods: exact, chunk-invariant and sort-free.

Three tools, each giving the same bits however a tensor is split into row chunks:

* **Radix select** (:class:`RankSelect`): keep the elements of descending magnitude rank
  ``[lo, hi)`` of a whole tensor (TIES keeps ``[0, k)``, breadcrumbs a window below the
  outliers). The k-th largest magnitude is found from histograms of the bit pattern of
  the float32 magnitude (non-negative floats order like their bit patterns as
  integers): a first statistic counts the top 16 bits, a second one the low 15 bits
  inside the one bucket that holds the rank. O(n), two streaming passes, integer
  counts (exact, order-independent). Ties at the threshold are broken by flat element
  index (lower index ranks higher), so exactly ``hi - lo`` elements are kept; the
  second statistic also keeps each chunk's count of threshold ties so a chunk knows
  how many tied elements come before it.
* **Exact sums** (:func:`exact_sum_partial`, :func:`exact_sum_combine`,
  :func:`exact_sum_value`): a float64 sum that is correctly rounded, hence independent
  of chunking and reduction order. Each value is split into three integer pieces of at
  most 18 bits scaled by a power of two; pieces are added per binary exponent (integer
  sums below 2^53 are exact in float64) and the few hundred bucket totals are summed
  once with :func:`math.fsum`.
* **Keyed randomness** (:func:`stream_key`, :func:`keyed_uniform`): uniform numbers in
  [0, 1) from splitmix64 of a counter, keyed by (seed, tensor name, model index) and
  indexed by the element's flat index in the whole tensor.

Everything here is pure tensor math; no I/O.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import torch

from dmerge.methods.base import ChunkInputs, Statistic

# Elements per step where a step needs several temporaries: small enough that a few
# float64 blocks stay in a core's L2 cache (elementwise work, so any block size gives
# the same bits).
BLOCK = 1 << 18
KEY_BLOCK = 1 << 20  # elements per step of the integer key passes (radix select)
GPU_BLOCK = 1 << 24  # on a GPU, large steps: kernel launches, not caches, are the cost


def block_size(t: torch.Tensor, cpu_block: int = BLOCK) -> int:
    """Elements per step for work on ``t``'s device."""
    return cpu_block if t.device.type == "cpu" else GPU_BLOCK


# ---------------------------------------------------------------------------------------
# Per-ChunkInputs cache: with a single-chunk tensor the statistics and the method run on
# the same ChunkInputs, so task vectors are computed once.


def cache(x: ChunkInputs) -> dict:
    return x.__dict__.setdefault("_sparsify_cache", {})


def non_base_indices(x: ChunkInputs) -> list[int]:
    """Source indices of every model except the base (the task vectors' models)."""
    return [i for i in range(len(x.model_params)) if i != x.base_index]


def task_vectors(x: ChunkInputs) -> dict[int, torch.Tensor]:
    """``{source index: x_i - base}`` for every non-base source.

    Computed once per ChunkInputs and *in place* of the source tensors (a merge only
    needs the base and the task vectors, so this saves one tensor per model).
    """
    c = cache(x)
    if "tv" not in c:
        base = x.base
        tvs = {}
        for i in non_base_indices(x):
            t = x.tensors[i]
            tvs[i] = t.sub_(base)
        c["tv"] = tvs
    return c["tv"]


def keep_mask(sparsifier: "Sparsifier", x: ChunkInputs, i: int):
    """Model ``i``'s keep-mask for this chunk (ALL, NONE or a bool tensor), computed once
    per ChunkInputs (the rescale statistic and the merge of a one-chunk tensor share it)."""
    masks = cache(x).setdefault("masks", {})
    if i not in masks:
        masks[i] = sparsifier.mask(x, i)
    return masks[i]


# ---------------------------------------------------------------------------------------
# Keyed randomness

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _as_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def stream_key(seed: int, tensor_name: str, model_index: int) -> int:
    """A 64-bit key for one model's random stream on one tensor.

    A stable hash (blake2b, not Python's per-process salted ``hash``) of the seed, the
    tensor name and the model's index among the recipe's sources.
    """
    digest = hashlib.blake2b(f"{seed}\x00{model_index}\x00{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def keyed_uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) for counters ``start .. start + count - 1``.

    splitmix64: ``z = key + (j + 1) * golden`` (mod 2^64), then its finalizer; the top 53
    bits make the number. int64 arithmetic wraps around modulo 2^64, which is what the
    generator needs; logical shifts are emulated with a mask.
    """
    z = torch.arange(start + 1, start + 1 + count, dtype=torch.int64, device=device)
    z.mul_(_as_int64(_GOLDEN)).add_(_as_int64(key))
    z = (z ^ _shr(z, 30)).mul_(_as_int64(_MIX1))
    z = (z ^ _shr(z, 27)).mul_(_as_int64(_MIX2))
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64).mul_(2.0**-53)


def splitmix64_reference(key: int, j: int) -> float:
    """Pure-Python value of :func:`keyed_uniform` for counter ``j`` (for tests)."""
    z = (key + (j + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z = z ^ (z >> 31)
    return (z >> 11) * 2.0**-53


def keyed_keep(x: ChunkInputs, model_index: int, like: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Bernoulli keep-mask of this chunk (shape of ``like``): ``u < p`` elementwise, with
    ``u`` the keyed uniform of each element's flat index in the whole tensor."""
    key = stream_key(x.seed, x.tensor_name, model_index)
    n = like.numel()
    keep = torch.empty(n, dtype=torch.bool, device=like.device)
    flat_p = p.reshape(-1) if isinstance(p, torch.Tensor) else None
    step = block_size(like)
    for s in range(0, n, step):
        e = min(n, s + step)
        u = keyed_uniform(key, x.element_offset + s, e - s, like.device)
        torch.lt(u, flat_p[s:e] if flat_p is not None else p, out=keep[s:e])
    return keep.reshape(like.shape)


# ---------------------------------------------------------------------------------------
# Exact float64 sums

ExactSum = tuple  # (min exponent, float64 tensor [3, span]) or None for an empty sum


def exact_sum_partial(values: torch.Tensor, *, absolute: bool = False, square: bool = False,
                      mask: torch.Tensor | None = None) -> ExactSum | None:
    """Partial of an exactly rounded sum of ``values`` (any shape, converted to float64),
    optionally of their absolute values or squares and only where ``mask`` is true
    (computed block by block, without full-size temporaries).

    ``v = M * 2^(e-53)`` with ``|M| < 2^53`` an integer (frexp); ``M`` is cut into pieces
    ``hi * 2^35 + mid * 2^17 + lo`` of at most 18 bits; each piece is added into a bucket
    of its exponent. Bucket totals stay integers below 2^53 for up to 2^35 terms, so the
    additions are exact in any order.
    """
    flat = values.reshape(-1)
    flat_mask = mask.reshape(-1) if mask is not None else None
    parts = []
    step = block_size(flat)
    for s in range(0, flat.numel(), step):
        v = flat[s: s + step].to(torch.float64)
        if absolute:
            v = v.abs()
        elif square:
            v = v.square()
        if flat_mask is not None:
            v = v * flat_mask[s: s + step]
        parts.append(_exact_sum_slice(v))
    return exact_sum_combine(parts)


def _exact_sum_slice(v: torch.Tensor) -> ExactSum:
    m, e = torch.frexp(v)
    m.mul_(2.0**53)  # integer-valued
    hi = torch.trunc(m * 2.0**-35)
    m.sub_(hi * 2.0**35)
    mid = torch.trunc(m * 2.0**-17)
    m.sub_(mid * 2.0**17)  # now the low piece
    e = e.to(torch.int64)
    emin, emax = int(e.min()), int(e.max())
    e.sub_(emin)
    span = emax - emin + 1
    sums = torch.stack([torch.bincount(e, weights=p, minlength=span) for p in (hi, mid, m)]).cpu()
    return (emin, sums)


def exact_sum_combine(partials: list[ExactSum | None]) -> ExactSum | None:
    parts = [p for p in partials if p is not None]
    if not parts:
        return None
    emin = min(p[0] for p in parts)
    emax = max(p[0] + p[1].shape[1] - 1 for p in parts)
    out = torch.zeros((3, emax - emin + 1), dtype=torch.float64)
    for lo, sums in parts:
        out[:, lo - emin: lo - emin + sums.shape[1]] += sums
    return (emin, out)


def exact_sum_value(partial: ExactSum | None) -> float:
    """The correctly rounded float64 value of a combined exact sum."""
    if partial is None:
        return 0.0
    emin, sums = partial
    terms = []
    for piece, shift in zip(sums.tolist(), (18, 36, 53)):
        for j, s in enumerate(piece):
            if s:
                terms.append(math.ldexp(s, emin + j - shift))
    return math.fsum(terms)


def exact_sum(values: torch.Tensor) -> float:
    return exact_sum_value(exact_sum_partial(values))


# ---------------------------------------------------------------------------------------
# Radix select

COARSE_SHIFT = 15  # stage 1: bits 30..15 of the float32 pattern (8 exponent + 8 mantissa bits)
COARSE_BINS = 1 << 16
FINE_BINS = 1 << COARSE_SHIFT
ALL = "all"
NONE = "none"


def magnitude_key(t: torch.Tensor) -> torch.Tensor:
    """int32 keys ordering like |t| rounded to float32.

    Rounding is symmetric, so |fl32(t)| == fl32(|t|); the float32 bit pattern of a
    non-negative number is a non-negative int32 ordered like the number.

    For a task vector ``t = x - b`` this is the same key whether ``t`` was computed in
    float64 or in float32 from parents that float32 holds exactly (bf16, fp16, fp32):
    the float64 difference is exact unless the exponents of x and b are more than 29
    apart, and then both roundings give the larger operand. That is why the selection
    statistics may read such parents as float32 (``input_dtype``), and it is exactly the
    magnitude mergekit ranks (it subtracts in float32).
    """
    k = t.abs() if t.dtype == torch.float32 else t.to(torch.float32).abs_()  # never modifies t
    return k.view(torch.int32)


def _sparse_counts(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.bincount(values.reshape(-1), minlength=bins)
    nz = h.nonzero().squeeze(1)
    return nz, h[nz]


def _dense(parts: list[tuple[torch.Tensor, torch.Tensor]], bins: int) -> torch.Tensor:
    h = torch.zeros(bins, dtype=torch.int64)
    for idx, cnt in parts:
        h.index_add_(0, idx.to(torch.int64), cnt)
    return h


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding descending rank ``rank`` (0 = largest) and how many elements lie above it."""
    above_incl = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count in bins >= b
    # the bin b with above_incl[b] > rank >= above_incl[b + 1]
    b = int((above_incl > rank).nonzero().max())
    above = int(above_incl[b] - hist[b])
    return b, above


class RankSelect:
    """Keep the elements of descending rank ``[lo, hi)`` by key, per selection id.

    ``key_block(x, id, start, stop)`` returns the int32 keys of flat elements
    ``[start, stop)`` of the chunk (non-negative, ordered like the ranking);
    ``wanted(ctx)`` the ids that may need selecting (from parameters alone);
    ``window(ctx, id, n, nonzero)`` the rank window ``(lo, hi)`` for ``n`` elements of
    which ``nonzero`` have a non-zero key. Two statistics named ``{name}_coarse`` and
    ``{name}_fine`` do the selection; :meth:`mask` applies it. Keys are computed block by
    block (``KEY_BLOCK`` elements), never for a whole chunk at once.
    """

    def __init__(self, name: str, key_block: Callable[[ChunkInputs, Any, int, int], torch.Tensor],
                 wanted: Callable[[ChunkInputs], list], window: Callable[[ChunkInputs, Any, int, int], tuple[int, int]],
                 input_dtype: str | None = None, count_nonzero: bool = False):
        self.name = name
        self.count_nonzero = count_nonzero  # does window() use the number of non-zero keys?
        self.key_block = key_block
        self.wanted = wanted
        self.window = window
        self.input_dtype = input_dtype  # keys need no more than this precision
        self.coarse_name = f"{name}_coarse"
        self.fine_name = f"{name}_fine"

    @staticmethod
    def _blocks(x: ChunkInputs):
        n = x.tensors[0].numel()
        step = block_size(x.tensors[0], KEY_BLOCK)
        for s in range(0, n, step):
            yield s, min(n, s + step)

    # -- stage 1 --------------------------------------------------------------------------

    def _coarse_chunk(self, x: ChunkInputs) -> dict:
        out = {}
        for i in self.wanted(x):
            hist = torch.zeros(COARSE_BINS, dtype=torch.int64)
            nonzero = 0
            for s, e in self._blocks(x):
                k = self.key_block(x, i, s, e)
                if self.count_nonzero:
                    nonzero += int(torch.count_nonzero(k))
                hist += torch.bincount(k.bitwise_right_shift_(COARSE_SHIFT), minlength=COARSE_BINS).cpu()
            nz = hist.nonzero().squeeze(1)
            out[i] = ((nz, hist[nz]), nonzero)
        return out

    @staticmethod
    def _coarse_combine(partials: list[dict]) -> dict:
        out = {}
        for i in partials[0]:
            dense = _dense([p[i][0] for p in partials], COARSE_BINS)
            nz = dense.nonzero().squeeze(1)
            out[i] = ((nz, dense[nz]), sum(p[i][1] for p in partials))
        return out

    def _coarse_finalize(self, combined: dict, ctx: ChunkInputs) -> dict:
        n = math.prod(ctx.full_shape)
        result = {}
        for i, (counts, nonzero) in combined.items():
            lo, hi = self.window(ctx, i, n, nonzero)
            if lo >= hi:
                result[i] = NONE
            elif lo == 0 and hi >= n:
                result[i] = ALL
            else:
                hist = _dense([counts], COARSE_BINS)
                targets = []
                # rank lo (the larger key) first; with lo = 0 only the last kept rank matters
                for rank in sorted({lo, hi - 1} - ({0} if hi > 1 else set())) or [0]:
                    b, above = _locate(hist, rank)
                    targets.append({"rank": rank, "bin": b, "above": above})
                result[i] = {"lo": lo, "hi": hi, "targets": targets}
        return result

    # -- stage 2 --------------------------------------------------------------------------

    def _fine_chunk(self, x: ChunkInputs) -> dict:
        coarse = x.stats[self.coarse_name]
        out = {}
        for i, r in coarse.items():
            if not isinstance(r, dict):
                continue
            bins = sorted({t["bin"] for t in r["targets"]})
            hists = {b: torch.zeros(FINE_BINS + 2, dtype=torch.int64) for b in bins}
            low = None
            for s, e in self._blocks(x):
                k = self.key_block(x, i, s, e)
                if low is None or low.numel() < k.numel():
                    low = torch.empty_like(k)
                for b in bins:
                    # low bits of the keys inside bucket b, shifted by one; keys outside
                    # land in the sentinel bins 0 and FINE_BINS + 1, dropped below
                    lb = torch.sub(k, b << COARSE_SHIFT, out=low[: k.numel()]).clamp_(-1, FINE_BINS).add_(1)
                    hists[b] += torch.bincount(lb, minlength=FINE_BINS + 2).cpu()
            for b, h in hists.items():
                h = h[1:-1]
                nz = h.nonzero().squeeze(1)
                out[(i, b)] = (nz, h[nz])
        return {x.row_start: out}

    @staticmethod
    def _fine_combine(partials: list[dict]) -> dict:
        out = {}
        for p in partials:
            out.update(p)  # one entry per chunk (keyed by its first row): order-independent
        return out

    def _fine_finalize(self, per_chunk: dict, ctx: ChunkInputs) -> dict:
        coarse = ctx.stats[self.coarse_name]
        starts = sorted(per_chunk)
        result = {}
        for i, r in coarse.items():
            if not isinstance(r, dict):
                result[i] = r
                continue
            thresholds = []
            for t in r["targets"]:
                b = t["bin"]
                hist = _dense([per_chunk[s][(i, b)] for s in starts], FINE_BINS)
                f, above_in_bin = _locate(hist, t["rank"] - t["above"])
                key = (b << COARSE_SHIFT) | f
                prefix, seen = {}, 0
                for s in starts:  # threshold ties in the chunks before each chunk
                    prefix[s] = seen
                    idx, cnt = per_chunk[s][(i, b)]
                    hit = (idx == f).nonzero()
                    seen += int(cnt[hit[0, 0]]) if hit.numel() else 0
                thresholds.append({"key": key, "above": t["above"] + above_in_bin, "prefix": prefix})
            result[i] = {"lo": r["lo"], "hi": r["hi"], "thresholds": thresholds}
        return result

    def statistics(self) -> list[Statistic]:
        def need_coarse(ctx):
            return bool(self.wanted(ctx))

        def need_fine(ctx):
            coarse = ctx.stats.get(self.coarse_name)
            return bool(coarse) and any(isinstance(r, dict) for r in coarse.values())

        return [
            Statistic(self.coarse_name, self._coarse_chunk, self._coarse_combine, self._coarse_finalize, need_coarse,
                      input_dtype=self.input_dtype),
            Statistic(self.fine_name, self._fine_chunk, self._fine_combine, self._fine_finalize, need_fine,
                      input_dtype=self.input_dtype),
        ]

    # -- applying -------------------------------------------------------------------------

    def result(self, x: ChunkInputs, i) -> Any:
        """ALL, NONE or the thresholds for selection id ``i`` (ALL when never wanted)."""
        fine = x.stats.get(self.fine_name)
        if fine is not None and i in fine:
            return fine[i]
        coarse = x.stats.get(self.coarse_name)
        if coarse is not None and i in coarse:
            return coarse[i]
        return ALL

    def mask(self, x: ChunkInputs, i) -> torch.Tensor | str:
        """Keep-mask of this chunk (flat bool tensor) for selection id ``i``, or ALL / NONE.

        Keys strictly inside the window's thresholds are kept; keys equal to a threshold
        get consecutive ranks in flat-index order, continuing from the chunks before.
        """
        r = self.result(x, i)
        if not isinstance(r, dict):
            return r
        lo, hi = r["lo"], r["hi"]
        ths = r["thresholds"]  # by rank: [rank lo,] rank hi - 1 (lo = 0 needs no upper cut)
        bottom = ths[-1]["key"]
        top = ths[0]["key"] if lo > 0 else None
        next_rank = {}
        for t in ths:  # the next tied element's rank, per threshold value
            next_rank.setdefault(t["key"], t["above"] + t["prefix"][x.row_start])
        keep = torch.empty(x.tensors[0].numel(), dtype=torch.bool, device=x.tensors[0].device)
        for s, e in self._blocks(x):
            k = self.key_block(x, i, s, e)
            out = keep[s:e]
            torch.gt(k, bottom, out=out)
            if top is not None:
                out &= k < top
            for key, first in next_rank.items():
                eq = k == key
                count = int(eq.sum())
                if count == 0:
                    continue
                next_rank[key] = first + count
                if first >= lo and first + count <= hi:
                    out |= eq  # every tie of this block is inside the window
                elif first + count > lo and first < hi:  # the window's edge falls in this block
                    idx = eq.nonzero().squeeze(1)
                    rank = torch.arange(first, first + count, dtype=torch.int64, device=idx.device)
                    out[idx[(rank >= lo) & (rank < hi)]] = True
        return keep


# ---------------------------------------------------------------------------------------
# The task-vector sparsifiers of mergekit's generalized task arithmetic

RESCALE_EPS = 1e-7  # as mergekit: no rescaling when either l1 norm is below this


def _density(x: ChunkInputs, i: int) -> float:
    return x.model_params[i]["density"]


class Sparsifier:
    """Turns one model's task vector (chunk) into a keep-mask.

    ``mask(x, i)`` returns ALL (keep everything; no rescaling either, as mergekit returns
    the task vector untouched for density >= 1), NONE, or a boolean tensor shaped like
    the chunk (call it through :func:`keep_mask`).
    """

    name = "none"
    random = False

    def active(self, x: ChunkInputs, i: int) -> bool:
        return _density(x, i) < 1

    def statistics(self) -> list[Statistic]:
        return []

    def mask(self, x: ChunkInputs, i: int):
        raise NotImplementedError


class _MagnitudeWindow(Sparsifier):
    """Keep a window of descending magnitude ranks of tau_i over the whole tensor."""

    def __init__(self, name: str):
        # the keys are float32 magnitudes: the selection passes read the parents as float32
        self.select = RankSelect(name, self._key_block, self._wanted, self._window, input_dtype="float32")

    def window(self, ctx: ChunkInputs, i: int, n: int) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def _key_block(x, i, start, stop):
        return magnitude_key(task_vectors(x)[i].reshape(-1)[start:stop])

    def _trivial(self, ctx, i):
        """ALL or NONE when the window needs no selection, else None."""
        n = math.prod(ctx.full_shape)
        if _density(ctx, i) >= 1:
            return ALL
        lo, hi = self.window(ctx, i, n)
        if lo >= hi:
            return NONE
        if lo == 0 and hi >= n:
            return ALL
        return None

    def _wanted(self, ctx):
        return [i for i in non_base_indices(ctx) if self._trivial(ctx, i) is None]

    def _window(self, ctx, i, n, nonzero):
        return self.window(ctx, i, n)

    def statistics(self):
        return self.select.statistics()

    def mask(self, x, i):
        trivial = self._trivial(x, i)
        return trivial if trivial is not None else self.select.mask(x, i).view(x.base.shape)


class MagnitudeTopK(_MagnitudeWindow):
    """TIES: keep the ``k = max(1, int(density * n))`` largest |tau| of the whole tensor
    (none at density 0)."""

    name = "magnitude"

    def __init__(self):
        super().__init__("topk")

    def window(self, ctx, i, n):
        d = _density(ctx, i)
        return (0, 0) if d <= 0 else (0, min(n, max(1, int(d * n))))


class MagnitudeOutliers(_MagnitudeWindow):
    """Breadcrumbs: drop the ``int(gamma * n)`` largest |tau| (the outliers), then keep the
    next ``int(density * n)``; the rest (the smallest) is dropped.

    When density + gamma > 1 fewer outliers are dropped, so that ``int(density * n)``
    elements are always kept (mergekit's rule).
    """

    name = "magnitude_outliers"

    def __init__(self):
        super().__init__("crumbs")

    def window(self, ctx, i, n):
        keep = int(_density(ctx, i) * n)
        n_top = int(ctx.model_params[i]["gamma"] * n)
        n_bottom = max(0, n - keep - n_top)
        return n - n_bottom - keep, n - n_bottom  # descending ranks


class RandomDrop(Sparsifier):
    """DARE: keep each element independently with probability ``density``."""

    name = "random"
    random = True

    def mask(self, x, i):
        d = _density(x, i)
        if d >= 1:
            return ALL
        if d <= 0:
            return NONE
        return keyed_keep(x, i, x.base, d)


class DellaMagprune(Sparsifier):
    """DELLA's MagPrune: keep probability grows linearly with the magnitude rank in its row.

    Per row (dimension 1 of a matrix; a vector is one row), ascending ranks ``r`` of |tau|
    (ties by column index) give ``p = density - epsilon + 2 * epsilon * (r - 1) / (C - 1)``
    for C columns (``p = density`` when C = 1).
    """

    name = "della_magprune"
    random = True

    def mask(self, x, i):
        d = _density(x, i)
        if d >= 1:
            return ALL
        if d <= 0:
            return NONE
        eps = x.model_params[i]["epsilon"]
        if eps == 0:
            return keyed_keep(x, i, x.base, d)
        tv = task_vectors(x)[i]
        mag = tv.abs() if tv.dim() >= 2 else tv.abs().unsqueeze(0)
        cols = mag.shape[1]
        if cols == 1:
            p = torch.full_like(mag, d)
        else:
            order = torch.sort(mag, dim=1, stable=True).indices
            del mag
            shape = [1] * order.dim()
            shape[1] = cols
            ranks = torch.arange(cols, dtype=tv.dtype, device=tv.device).reshape(shape).expand_as(order)
            p = torch.empty(order.shape, dtype=tv.dtype, device=tv.device).scatter_(1, order, ranks)
            del order
            p.mul_(2 * eps / (cols - 1)).add_(d - eps)
        return keyed_keep(x, i, tv, p.reshape(tv.shape))


def rescale_statistic(sparsifier: Sparsifier) -> Statistic:
    """mergekit's ``rescale``: scale each sparsified task vector by
    ``sum|tau| / sum|mask * tau|`` over the whole tensor (its l1 norm is kept)."""

    def wanted(ctx):
        if not ctx.params.get("rescale"):
            return []
        return [i for i in non_base_indices(ctx) if sparsifier.active(ctx, i)]

    def chunk(x):
        ids = wanted(x)
        masks = {i: keep_mask(sparsifier, x, i) for i in ids}
        tvs = task_vectors(x)
        out = {}
        for i in ids:
            tv, m = tvs[i], masks[i]
            before = exact_sum_partial(tv, absolute=True)
            if isinstance(m, str):
                out[i] = (before, before if m == ALL else None)
            else:
                out[i] = (before, exact_sum_partial(tv, absolute=True, mask=m))
        return out

    def combine(partials):
        return {i: (exact_sum_combine([p[i][0] for p in partials]), exact_sum_combine([p[i][1] for p in partials]))
                for i in partials[0]}

    def finalize(combined, ctx):
        factors = {}
        for i, (b, a) in combined.items():
            before, after = exact_sum_value(b), exact_sum_value(a)
            factors[i] = before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0
        return factors

    return Statistic("rescale", chunk, combine, finalize, lambda ctx: bool(wanted(ctx)))
