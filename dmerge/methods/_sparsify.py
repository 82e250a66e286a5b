"""Building blocks of the sparsifying methods: exact, chunk-invariant and sort-free.

Each gives the same bits however a tensor is split into row chunks (and chunks into
row blocks):

* **Radix select** (:class:`RankSelect`): keep the elements of descending magnitude rank
  ``[lo, hi)`` of a whole tensor (TIES keeps ``[0, k)``, breadcrumbs a window below the
  outliers). The keys bounding the window are found by the radix select of
  :mod:`dmerge.methods._select` over the float32 magnitude's bit pattern: a first
  statistic counts the top 16 bits, a second one the low 15 bits inside the bucket
  that holds each bounding rank. O(n), integer counts (exact, order-independent);
  usually one streaming pass, because the first statistic also counts the low bits of
  the bucket a sample predicts (the second then reads no data where the guess was
  right). Ties at the threshold are broken by flat element index (lower index ranks
  higher), so exactly ``hi - lo`` elements are kept.
* **Keyed randomness** (:func:`stream_key`, :func:`keyed_bits`, :func:`keyed_keep`):
  32-bit uniform numbers from splitmix64 of a counter, keyed by (seed, tensor name,
  model index) and indexed by the element's flat index in the whole tensor.
* Tensor-wide sums (rescale norms, SCE's mean squares) use the split-independent
  row-tree sums of :mod:`dmerge.methods._reduce`.

The methods take their inputs as stored (``raw_inputs``) and work row block by row
block (:func:`dmerge.methods._reduce.row_blocks`), so temporaries stay small. Pure
tensor math; no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable

from dmerge.lazy import torch

from dmerge import native
from dmerge.methods._reduce import chunk_partial, compute_dtype, row_sums, tree_combine, tree_total
# the row-block iterator, under the name this module's passes call (tests count the passes by it)
from dmerge.methods._reduce import row_blocks as blocks
from dmerge.methods._select import (
    ALL, MAGNITUDE_KEYS, NONE, Histogram, RadixSelect, magnitude_key, sparse,
)
from dmerge.methods.base import ChunkInputs, Statistic
from dmerge.numerics import widen


def non_base_indices(x: ChunkInputs) -> list[int]:
    """Source indices of every model except the base (the task vectors' models)."""
    return [i for i in range(len(x.model_params)) if i != x.base_index]


_EXACT_IN_FLOAT32 = ("bfloat16", "float16", "float32")  # dtype names (torch is imported on first use)


def _dtype_name(dtype) -> str:
    return str(dtype).rpartition(".")[2]


def key_dtype(x: ChunkInputs) -> torch.dtype:
    """float32 when the parents are stored in a type float32 holds exactly (then a float32
    task vector has the same magnitude keys as the float64 one, see :func:`magnitude_key`),
    else the compute dtype. Selection passes need only keys, so they compute in this."""
    return torch.float32 if all(_dtype_name(t.dtype) in _EXACT_IN_FLOAT32 for t in x.tensors) else compute_dtype(x)


def block_task_vectors(xb: ChunkInputs, ids: list[int]) -> dict[int, torch.Tensor]:
    """``{i: x_i - base}`` for one block (new tensors, in the compute dtype)."""
    base = xb.base
    return {i: xb.tensors[i] - base for i in ids}


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


def _splitmix64(first: int, count: int, key: int, device) -> torch.Tensor:
    """splitmix64 outputs for counters ``first .. first + count - 1`` (int64 bit patterns):
    ``z = key + (c + 1) * golden`` (mod 2^64), then its finalizer. int64 arithmetic wraps
    around modulo 2^64, which is what the generator needs; logical shifts are emulated."""
    z = torch.arange(first + 1, first + 1 + count, dtype=torch.int64, device=device)
    z.mul_(_as_int64(_GOLDEN)).add_(_as_int64(key))
    z = (z ^ _shr(z, 30)).mul_(_as_int64(_MIX1))
    z = (z ^ _shr(z, 27)).mul_(_as_int64(_MIX2))
    return z ^ _shr(z, 31)


def keyed_bits(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform 32-bit integers (in int64) for elements ``start .. start + count - 1``.

    Element ``j`` takes the low (even ``j``) or high (odd ``j``) half of splitmix64 of
    counter ``j // 2``: one hash serves two elements.
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first = start // 2
    z = _splitmix64(first, (start + count - 1) // 2 - first + 1, key, device)
    halves = torch.stack([z & 0xFFFFFFFF, _shr(z, 32)], dim=1).reshape(-1)
    return halves[start - 2 * first: start - 2 * first + count]


def keyed_uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniforms in [0, 1) behind :func:`keyed_keep`: ``keyed_bits / 2^32`` (float64)."""
    return keyed_bits(key, start, count, device).to(torch.float64).mul_(2.0**-32)


def keyed_bits_reference(key: int, j: int) -> int:
    """Pure-Python value of :func:`keyed_bits` for element ``j`` (for tests)."""
    z = (key + (j // 2 + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    z = z ^ (z >> 31)
    return (z >> 32) if j % 2 else (z & 0xFFFFFFFF)


def keyed_keep(x: ChunkInputs, model_index: int, like: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Bernoulli keep-mask shaped like ``like`` (the rows of ``x``): ``u < p`` elementwise,
    with ``u = bits / 2^32`` the keyed uniform of each element's flat index in the whole
    tensor (compared as integers: ``bits < ceil(p * 2^32)``, exact)."""
    key = stream_key(x.seed, x.tensor_name, model_index)
    bits = keyed_bits(key, x.element_offset, like.numel(), like.device).reshape(like.shape)
    if isinstance(p, torch.Tensor):
        return bits < p.mul(2.0**32).ceil_().to(torch.int64)
    return bits < keep_threshold(p)


def keep_threshold(p: float) -> int:
    """Keyed bits below this are kept: ``ceil(p * 2^32)``, so P(keep) = p to 2^-32."""
    return math.ceil(p * 2.0**32)


# ---------------------------------------------------------------------------------------
# Radix select of a window of ranks

# The magnitude keys' layout, in the names the fused kernel (gta.c) and RankSelect's
# prediction use: the coarse bins, then FINE_BINS per predicted bucket.
COARSE_SHIFT = MAGNITUDE_KEYS.shift
COARSE_BINS = MAGNITUDE_KEYS.buckets
FINE_BINS = MAGNITUDE_KEYS.fine_bins
PREDICT_ELEMENTS = 1 << 16  # sample size of the bucket prediction (see RankSelect._predict_buckets)
PREDICT_BUCKETS = 32  # at most this many buckets per target rank are predicted (counted finely)


def _target_ranks(lo: int, hi: int) -> list[int]:
    """The descending ranks whose keys bound the window [lo, hi): rank lo (the larger
    key) first; with lo = 0 only the last kept rank matters."""
    return sorted({lo, hi - 1} - ({0} if hi > 1 else set())) or [0]


class RankSelect(RadixSelect):
    """Keep the elements of descending rank ``[lo, hi)`` by magnitude key, per selection id.

    ``keys(xb, ids)`` returns ``{id: int32 keys}`` of one row block (non-negative keys,
    ordered like the ranking, as :func:`magnitude_key`); ``wanted(ctx)`` the ids that may
    need selecting (from parameters alone); ``window(ctx, id, n, nonzero)`` the rank
    window ``(lo, hi)`` for ``n`` elements of which ``nonzero`` have a non-zero key. Two
    statistics named ``{name}_coarse`` and ``{name}_fine`` do the selection (the radix
    select of :mod:`dmerge.methods._select`, with a bucket prediction and the fused
    kernel); :meth:`masker` applies it block by block.
    """

    def __init__(self, name: str, keys: Callable[[ChunkInputs, list], dict], wanted: Callable[[ChunkInputs], list],
                 window: Callable[[ChunkInputs, Any, int, int], tuple[int, int]], count_nonzero: bool = False,
                 pass_dtype: Callable[[ChunkInputs], torch.dtype] | None = None,
                 task_vector_magnitudes: bool = False):
        super().__init__(f"{name}_coarse", f"{name}_fine", MAGNITUDE_KEYS, keys, wanted, self._window_ranks,
                         count_nonzero, pass_dtype)
        self.window = window
        # keys are magnitude_key(x_i - base) for the non-base ids i: the fused kernel
        # (dmerge.native) can then count them without calling ``keys``
        self.task_vector_magnitudes = task_vector_magnitudes

    def _window_ranks(self, ctx: ChunkInputs, i, n: int, nonzero: int) -> list[int] | str:
        """The ranks to find for selection ``i``'s window, or ALL / NONE where it needs none."""
        lo, hi = self.window(ctx, i, n, nonzero)
        if lo >= hi:
            return NONE
        if lo == 0 and hi >= n:
            return ALL
        return _target_ranks(lo, hi)

    # -- stage 1, with the fine histograms of predicted buckets --------------------------------

    def _coarse_chunk(self, x: ChunkInputs) -> dict:
        """Coarse histograms of the chunk's keys, and the fine histogram of the bucket(s) a
        sample of the chunk predicts will hold each target rank: where the prediction is
        right (nearly always) the fine statistic needs no second pass over the data."""
        ids = self.wanted(x)
        predicted = self._predict_buckets(x, ids)
        n_bins = COARSE_BINS + FINE_BINS * max([len(bs) for bs in predicted.values()] or [0])
        hists = {i: torch.zeros(n_bins, dtype=torch.int64) for i in ids}
        nonzero = dict.fromkeys(ids, 0)
        if not self._count_native(x, ids, predicted, hists):
            nonzero = self._count_keys(blocks(x, self.pass_dtype(x)), ids, hists,
                                       lambda i, k: self._bin_index(k, predicted.get(i, ())))
        out = {}
        for i in ids:
            coarse, fine = self._unpack(hists[i], predicted.get(i, ()))
            out[i] = (coarse, nonzero[i], {x.row_start: fine})
        return out

    def _native_applies(self, x: ChunkInputs) -> bool:
        """Whether the fused kernel can count this chunk's keys."""
        return (self.task_vector_magnitudes and not self.count_nonzero and self.pass_dtype(x) == torch.float32
                and native.usable(*x.tensors))

    def _count_native(self, x: ChunkInputs, ids: list, predicted: dict, hists: dict) -> bool:
        """Count the chunk's keys into the dense ``hists`` (laid out as :meth:`_bin_index`)
        with the fused kernel; False (nothing counted) where it does not apply."""
        if not ids or not self._native_applies(x):
            return False
        native.magnitude_histograms(x.base, [x.tensors[i] for i in ids], [hists[i] for i in ids],
                                    [list(predicted.get(i, ())) for i in ids])
        return True

    @staticmethod
    def _bin_index(k: torch.Tensor, buckets) -> torch.Tensor:
        """Histogram index of each key: its coarse bucket, or for a key inside the j-th
        predicted bucket, ``COARSE_BINS + j * FINE_BINS +`` its low bits (one count
        gives both histograms)."""
        index = k >> COARSE_SHIFT
        if len(buckets) > 2:  # a range of buckets (continuous keys): one lookup, not a pass per bucket
            first = buckets[0]
            table = torch.full((buckets[-1] - first + 1,), -1, dtype=index.dtype, device=index.device)
            table[torch.tensor(buckets, device=index.device) - first] = torch.arange(
                len(buckets), dtype=index.dtype, device=index.device)
            offset = index - first
            inside = (offset >= 0) & (offset < table.numel())
            position = table[offset.clamp(0, table.numel() - 1)]
            inside &= position >= 0
            fine = position.mul_(FINE_BINS).add_(k & (FINE_BINS - 1)).add_(COARSE_BINS)
            return torch.where(inside, fine, index)
        for j, b in enumerate(buckets):
            # integer arithmetic only (torch.where is several times slower here):
            # inside = 1 - min(|bucket - b|, 1); index += inside * (fine index - index),
            # where a key's fine index is k - b * FINE_BINS + COARSE_BINS + j * FINE_BINS
            inside = (index - b).abs_().clamp_(max=1).neg_().add_(1)
            step = (k + (COARSE_BINS + j * FINE_BINS - (b << COARSE_SHIFT))).sub_(index)
            index.add_(step.mul_(inside))
        return index

    @staticmethod
    def _unpack(hist: torch.Tensor, buckets) -> tuple[Histogram, dict]:
        """Split a dense histogram laid out as :meth:`_bin_index` into the coarse histogram
        and ``{bucket: fine histogram}`` of the predicted ``buckets`` (sparse)."""
        coarse = hist[:COARSE_BINS].clone()
        fine = {}
        for j, b in enumerate(buckets):
            part = hist[COARSE_BINS + j * FINE_BINS: COARSE_BINS + (j + 1) * FINE_BINS]
            coarse[b] = part.sum()  # the bucket's keys were counted in its fine bins only
            fine[b] = sparse(part)
        return sparse(coarse), fine

    def _predict_buckets(self, x: ChunkInputs, ids: list) -> dict:
        """``{id: [bucket, ...]}``: the coarse bucket of each target rank's key, predicted from
        a sample of about ``PREDICT_ELEMENTS`` keys (whole rows, evenly strided through the
        chunk): the buckets holding the sample's keys within a few standard errors of the
        target quantile, when there are at most ``PREDICT_BUCKETS`` of them, fewer on
        small chunks, one without the fused kernel (one for the heavily tied magnitudes
        of bf16 task vectors, a range for continuous ones);
        otherwise no prediction. Only a guess: a wrong one costs the fine pass it would
        have saved. Selections whose window depends on the non-zero count
        are not predicted."""
        if self.count_nonzero or not ids or not x.tensors[0].numel():
            return {}
        n = math.prod(x.full_shape)
        ref = x.tensors[0]
        rows, row_elements = (ref.shape[0], ref[0].numel()) if ref.dim() >= 2 else (1, ref.numel())
        stride = max(1, rows // max(1, PREDICT_ELEMENTS // max(1, row_elements)))
        dtype = self.pass_dtype(x)
        picked = [t[::stride] if t.dim() >= 2 else t for t in x.tensors]
        sample = dataclasses.replace(x, tensors=[widen(t, dtype) for t in picked], compute_dtype=None)
        # each finely counted bucket costs a fixed 32K bins per chunk: worth it on big chunks,
        # and only with the fused kernel (torch spends more on a range than on a fine pass)
        limit = max(1, min(PREDICT_BUCKETS, x.tensors[0].numel() >> 19)) if self._native_applies(x) else 1
        predicted = {}
        for i, keys in self.keys(sample, ids).items():
            keys = keys.reshape(-1)
            m = keys.numel()
            ranks = self.ranks(x, i, n, 0)
            if isinstance(ranks, str) or m == 0:
                continue
            buckets = set()
            for rank in ranks:
                q = rank / n
                at = q * m  # descending position in the sample
                spread = 4 * math.sqrt(m * q * (1 - q)) + 1  # the sample quantile's error, generously
                low, high = sorted(int(torch.kthvalue(keys, m - min(m - 1, max(0, int(p)))).values) >> COARSE_SHIFT
                                   for p in (at - spread, at + spread))
                if high - low >= limit:  # too wide a range to count every bucket finely
                    buckets = set()
                    break
                buckets |= set(range(low, high + 1))
            if buckets:
                predicted[i] = sorted(buckets)
        return predicted

    # -- stage 2, counted by the fused kernel where it applies ---------------------------------

    def _fine_chunk(self, x: ChunkInputs) -> dict:
        """``{first row: {(id, bucket): fine histogram}}`` of one chunk: those its coarse pass
        counted, and the buckets whose prediction missed, counted now."""
        counts, missed = self._fine_plan(x)
        if missed:
            counts.update(self._fine_native(x, missed) or self._count_fine(blocks(x, self.pass_dtype(x)), missed))
        return {x.row_start: counts}

    def _fine_native(self, x: ChunkInputs, missed: dict) -> dict | None:
        """The fine histograms of the ``missed`` buckets (``{id: {bucket}}``) by the fused
        kernel, which counts them as it would predicted buckets; None where it does not
        apply."""
        buckets = {i: sorted(bs) for i, bs in missed.items()}
        width = max(len(bs) for bs in buckets.values())
        hists = {i: torch.zeros(COARSE_BINS + FINE_BINS * width, dtype=torch.int64) for i in buckets}
        if not self._count_native(x, list(buckets), buckets, hists):
            return None
        return {(i, b): h for i in buckets for b, h in self._unpack(hists[i], buckets[i])[1].items()}

    # -- applying -------------------------------------------------------------------------

    def result(self, x: ChunkInputs, i) -> Any:
        """ALL, NONE or the thresholds for selection id ``i`` (ALL when never wanted). The
        fine statistic holds every wanted id's result (it runs whenever the coarse one does)."""
        return (x.stats.get(self.fine_name) or {}).get(i, ALL)

    def cut(self, x: ChunkInputs, i) -> Any:
        """ALL, NONE, or this chunk's view of selection ``i`` as plain numbers: keep keys
        strictly between ``bottom`` and ``top`` (None: no upper cut), and give keys equal
        to a threshold value the ranks ``first, first + 1, ...`` in flat order (``ties``:
        ``[(key, first)]``, ranks continuing from the chunks before), kept inside
        ``[lo, hi)``."""
        r = self.result(x, i)
        if not isinstance(r, dict):
            return r
        lo, hi = self.window(x, i, r["n"], r["nonzero"])
        ths = r["thresholds"]  # by rank: [rank lo,] rank hi - 1 (lo = 0 needs no upper cut)
        next_rank = {}
        for t in ths:  # the next tied element's rank, per threshold value
            next_rank.setdefault(t["key"], t["above"] + t["prefix"][x.row_start])
        return {"lo": lo, "hi": hi, "bottom": ths[-1]["key"], "top": ths[0]["key"] if lo > 0 else None,
                "ties": list(next_rank.items())}

    def masker(self, x: ChunkInputs, i) -> Callable[[torch.Tensor], torch.Tensor | str]:
        """A function from the keys of each row block of this chunk, *in order*, to its
        keep-mask (a bool tensor shaped like the keys), or ALL / NONE.

        Keys strictly inside the window's thresholds are kept; keys equal to a threshold
        get consecutive ranks in flat-index order, continuing from the chunks and blocks
        before.
        """
        r = self.cut(x, i)
        if not isinstance(r, dict):
            return lambda keys: r
        lo, hi, bottom, top = r["lo"], r["hi"], r["bottom"], r["top"]
        next_rank = dict(r["ties"])

        def mask(keys: torch.Tensor) -> torch.Tensor:
            keep = keys > bottom
            if top is not None:
                keep &= keys < top
            flat = keep.view(-1)
            for key, first in next_rank.items():
                if first >= hi:  # every later tie ranks past the window: none is kept, none need counting
                    continue
                eq = keys.reshape(-1) == key
                count = int(eq.sum())
                if count == 0:
                    continue
                next_rank[key] = first + count
                if first >= lo and first + count <= hi:
                    flat |= eq  # every tie of this block is inside the window
                elif first + count > lo and first < hi:  # the window's edge falls in this block
                    idx = eq.nonzero().squeeze(1)
                    rank = torch.arange(first, first + count, dtype=torch.int64, device=idx.device)
                    flat[idx[(rank >= lo) & (rank < hi)]] = True
            return keep

        return mask


# ---------------------------------------------------------------------------------------
# The task-vector sparsifiers of mergekit's generalized task arithmetic

RESCALE_EPS = 1e-7  # as mergekit: no rescaling when either l1 norm is below this


def _density(x: ChunkInputs, i: int) -> float:
    return x.model_params[i]["density"]


class Sparsifier:
    """Turns one model's task vector into a keep-mask, row block by row block.

    ``masker(x, i)`` returns a function called with each row block ``xb`` of chunk ``x``
    *in order* and model ``i``'s task vector on it; it answers ALL (keep everything; no
    rescaling either, as mergekit returns the task vector untouched for density >= 1),
    NONE, or a boolean tensor shaped like the block.
    """

    name = "none"
    random = False

    def active(self, x: ChunkInputs, i: int) -> bool:
        return _density(x, i) < 1

    def statistics(self) -> list[Statistic]:
        return []

    def masker(self, x: ChunkInputs, i: int) -> Callable[[ChunkInputs, torch.Tensor], Any]:
        raise NotImplementedError

    def plain_mask(self, x: ChunkInputs, i: int) -> dict | None:
        """Model ``i``'s keep-mask on chunk ``x`` as plain numbers, for the fused kernel
        (:mod:`dmerge.native`): ``{"kind": "all" | "none"}``, ``{"kind": "window", **cut}``
        (see :meth:`RankSelect.cut`) or ``{"kind": "random", "key", "threshold"}`` (keep
        where the keyed bits are below the threshold). None: only :meth:`masker` can."""
        return None


class _MagnitudeWindow(Sparsifier):
    """Keep a window of descending magnitude ranks of tau_i over the whole tensor."""

    def __init__(self, name: str):
        self.select = RankSelect(name, self._keys, self._wanted, self._window, pass_dtype=key_dtype,
                                 task_vector_magnitudes=True)

    def window(self, ctx: ChunkInputs, i: int, n: int) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def _keys(xb, ids):
        return {i: magnitude_key(tv) for i, tv in block_task_vectors(xb, ids).items()}

    def _trivial(self, ctx, i):
        """ALL or NONE when the window needs no selection, else None."""
        if _density(ctx, i) >= 1:
            return ALL
        ranks = self.select.ranks(ctx, i, math.prod(ctx.full_shape), 0)
        return ranks if isinstance(ranks, str) else None

    def _wanted(self, ctx):
        return [i for i in non_base_indices(ctx) if self._trivial(ctx, i) is None]

    def _window(self, ctx, i, n, nonzero):
        return self.window(ctx, i, n)

    def statistics(self):
        return self.select.statistics()

    def masker(self, x, i):
        trivial = self._trivial(x, i)
        if trivial is not None:
            return lambda xb, tv: trivial
        select = self.select.masker(x, i)
        return lambda xb, tv: select(magnitude_key(tv))

    def plain_mask(self, x, i):
        cut = self._trivial(x, i)
        if cut is None:
            cut = self.select.cut(x, i)
        return {"kind": cut} if isinstance(cut, str) else {"kind": "window", **cut}


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

    def masker(self, x, i):
        d = _density(x, i)
        if d >= 1:
            return lambda xb, tv: ALL
        if d <= 0:
            return lambda xb, tv: NONE
        probability = self.probability(x, i, d)
        return lambda xb, tv: keyed_keep(xb, i, tv, probability(tv))

    def probability(self, x: ChunkInputs, i: int, d: float) -> Callable[[torch.Tensor], float | torch.Tensor]:
        """Keep probability of each element of a block's task vector (0 < density < 1)."""
        return lambda tv: d

    def plain_mask(self, x, i):
        d = _density(x, i)
        if d >= 1:
            return {"kind": ALL}
        if d <= 0:
            return {"kind": NONE}
        return {"kind": "random", "key": stream_key(x.seed, x.tensor_name, i), "threshold": keep_threshold(d)}


class DellaMagprune(RandomDrop):
    """DELLA's MagPrune: keep probability grows linearly with the magnitude rank in its row.

    Per row (dimension 1 of a matrix; a vector is one row), ascending ranks ``r`` of |tau|
    (ties by column index) give ``p = density - epsilon + 2 * epsilon * r / (C - 1)``
    for C columns (``p = density`` when C = 1). With epsilon 0 it is DARE's drop.
    """

    name = "della_magprune"

    def probability(self, x, i, d):
        eps = x.model_params[i]["epsilon"]
        if eps == 0:
            return super().probability(x, i, d)
        return lambda tv: _magprune_probability(tv, d, eps)

    def plain_mask(self, x, i):
        # per-element probabilities from row ranks: only the torch path applies them
        return super().plain_mask(x, i) if x.model_params[i]["epsilon"] == 0 else None


def _magprune_probability(tv: torch.Tensor, d: float, eps: float) -> torch.Tensor:
    """Keep probabilities from ascending magnitude ranks within each row (along dimension
    1; a vector is one row). Ranked by the float32 magnitude key, ties by column: one
    sort of unique int64 keys ``key << bits | column`` (no stable sort needed)."""
    mag = tv if tv.dim() >= 2 else tv.unsqueeze(0)
    cols = mag.shape[1]
    if cols == 1:
        return torch.full(tv.shape, d, dtype=tv.dtype, device=tv.device)
    shape = [1] * mag.dim()
    shape[1] = cols
    column = torch.arange(cols, dtype=torch.int64, device=tv.device).reshape(shape)
    combined = magnitude_key(mag).to(torch.int64).bitwise_left_shift_((cols - 1).bit_length()).add_(column)
    order = torch.sort(combined, dim=1).indices
    del combined
    ranks = column.to(tv.dtype).expand_as(order)
    p = torch.empty(order.shape, dtype=tv.dtype, device=tv.device).scatter_(1, order, ranks)
    return p.mul_(2 * eps / (cols - 1)).add_(d - eps).reshape(tv.shape)


def keep_bits_key(x: ChunkInputs, i: int, plain: dict) -> tuple:
    """Where in ``x.scratch`` model ``i``'s drawn random keep-mask on chunk ``x`` is kept
    (everything that decides the bits: the stream, the threshold and the elements)."""
    return ("keep_bits", i, plain["key"], plain["threshold"], x.element_offset, x.tensors[0].numel())


_NATIVE_MASKS = {ALL: "MASK_ALL", NONE: "MASK_NONE", "random": "MASK_RANDOM"}


def _rescale_partial_native(x: ChunkInputs, ids: list[int], sparsifier: Sparsifier):
    """The rescale statistic's partial of chunk ``x`` by the fused kernel, bit for bit
    the torch code's (same row sums in the same order); None where it does not apply
    (kernels unavailable, not float64 compute, a mask other than all / none / random).

    The random keep-masks it draws are left in ``x.scratch`` (packed bits), and the
    write pass of the same chunk (:func:`dmerge.methods._gta._merge_native`) uses them:
    each element's keyed random bits are drawn once per task, not twice."""
    if not ids or compute_dtype(x) != torch.float64 or len(ids) > native.MAX_MODELS or not native.usable(*x.tensors):
        return None
    ref = x.tensors[0]
    rows = ref.shape[0] if ref.dim() else 1
    if not rows:
        return None
    models, plains = [], []
    for i in ids:
        plain = sparsifier.plain_mask(x, i)
        if plain is None or plain["kind"] not in _NATIVE_MASKS:
            return None
        m = native.Model(data=x.tensors[i].data_ptr(), dtype=native.dtype_codes()[x.tensors[i].dtype],
                         mask=getattr(native, _NATIVE_MASKS[plain["kind"]]))
        if plain["kind"] == "random":
            m.key, m.threshold = plain["key"], plain["threshold"]
        models.append(m)
        plains.append(plain)
    values, bits = native.masked_l1_rows(x.base, models, rows, ref.numel() // rows, x.element_offset, keep_bits=True)
    for i, plain, b in zip(ids, plains, bits):
        if b is not None:
            x.scratch[keep_bits_key(x, i, plain)] = b
    return chunk_partial(x, [(x, values)])


def rescale_statistic(sparsifier: Sparsifier) -> Statistic:
    """mergekit's ``rescale``: scale each sparsified task vector by
    ``sum|tau| / sum|mask * tau|`` over the whole tensor (its l1 norm is kept).

    The two sums per model are split-independent row-tree sums (``_reduce``)."""

    def wanted(ctx):
        if not ctx.params.get("rescale"):
            return []
        return [i for i in non_base_indices(ctx) if sparsifier.active(ctx, i)]

    def chunk(x):
        ids = wanted(x)
        partial = _rescale_partial_native(x, ids, sparsifier)
        if partial is not None:
            return partial
        maskers = {i: sparsifier.masker(x, i) for i in ids}

        def l1_rows(xb):  # per row, for each model: sum |tau|, sum |kept tau|
            cols = []
            for i, tv in block_task_vectors(xb, ids).items():
                m = maskers[i](xb, tv)
                a = tv.abs_()
                before = row_sums(a)  # may be a view of ``a`` (one element per row): no in-place below
                after = before if m is ALL else (torch.zeros_like(before) if m is NONE else row_sums(a * m))
                cols += [before, after]
            return torch.stack(cols, dim=1)

        return chunk_partial(x, ((xb, l1_rows(xb)) for xb in blocks(x)))  # blocks in order, as maskers need

    def finalize(partial, ctx):
        total = tree_total(partial).tolist()
        factors = {}
        for k, i in enumerate(wanted(ctx)):
            before, after = total[2 * k], total[2 * k + 1]
            factors[i] = before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0
        return factors

    return Statistic("rescale", chunk, tree_combine, finalize, lambda ctx: bool(wanted(ctx)))
