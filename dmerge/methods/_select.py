"""Radix select: the keys of chosen ranks among all keys of a tensor split into chunks.

Exact, and the same however the tensor was chunked: no sort of the tensor and no
sampling, only integer counts, whose sums do not depend on order or grouping.

Every value gets an integer key that orders as the values do (:func:`magnitude_key`:
int32, of ``|t|`` rounded to float32, for the sparsifiers; :func:`sortable_keys`:
int64, of a float64 value, for order statistics). A :class:`KeyLayout` splits a key
into a coarse *bucket* (its high bits) and its low bits. Two statistics find a rank:

1. **coarse**: every chunk counts its keys per bucket. The summed counts tell which
   bucket holds each target rank, and how many keys lie above that bucket.
2. **fine**: every chunk counts the low bits of its keys inside those buckets. The
   counts of all chunks give the key of each target rank exactly; each chunk's own
   count of that key tells later chunks how many equal keys come before them (callers
   break ties by flat index).

Histograms are kept sparse (occupied values only), so partials stay small next to the
tensor. :class:`RadixSelect` is the algorithm. :func:`order_statistics` uses it for
quantiles (arcee_fusion); :class:`dmerge.methods._sparsify.RankSelect` for windows of
descending rank (TIES, breadcrumbs, SCE), adding a bucket prediction that usually
spares the second pass and counting with the fused kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from dmerge.lazy import torch

from dmerge.methods._reduce import compute_dtype, row_blocks
from dmerge.methods.base import ChunkInputs, Statistic

ALL = "all"  # everything is selected: no key needs finding
NONE = "none"  # nothing is selected

Histogram = "tuple[torch.Tensor, torch.Tensor]"  # (distinct values ascending, int64; their counts, int64)

# Histograms over at most this many values are counted and summed in a dense vector
# (16 MiB at most); wider ones (the low 44 bits of float64 keys) by sorting their values.
DENSE_BINS = 1 << 21


# ---------------------------------------------------------------------------------------
# Keys


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """How an integer key splits into a coarse bucket and its ``shift`` low bits:
    ``bucket = (key >> shift) + offset`` lies in ``[0, buckets)`` (``offset`` makes the
    buckets of signed keys count from 0)."""

    shift: int
    buckets: int
    offset: int = 0

    @property
    def fine_bins(self) -> int:
        """How many values the low bits take."""
        return 1 << self.shift

    def bucket(self, keys: torch.Tensor) -> torch.Tensor:
        b = keys >> self.shift
        return b + self.offset if self.offset else b

    def low(self, keys: torch.Tensor) -> torch.Tensor:
        return keys & (self.fine_bins - 1)

    def key(self, bucket: int, low: int) -> int:
        """The key with low bits ``low`` in bucket ``bucket``."""
        return ((bucket - self.offset) << self.shift) | low


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


# Magnitude keys: bits 30..15 (8 exponent and 8 mantissa bits) are the bucket, 15 low bits
# (the fused kernel, dmerge/native/gta.c, counts with the same layout).
MAGNITUDE_KEYS = KeyLayout(shift=15, buckets=1 << 16)

_LOW63 = 0x7FFFFFFFFFFFFFFF


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the float64 values are (-0.0 just below +0.0; no NaN)."""
    bits = values.to(torch.float64).contiguous().view(torch.int64)
    return bits ^ ((bits >> 63) & _LOW63)


def key_value(key: int) -> float:
    """The float64 value of a :func:`sortable_keys` key."""
    bits = key ^ (_LOW63 if key < 0 else 0)
    return torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()


# float64 keys: the top 20 bits (sign, exponent and 8 mantissa bits: 256 buckets per
# binade) are the bucket, 44 low bits.
FLOAT64_KEYS = KeyLayout(shift=44, buckets=1 << 20, offset=1 << 19)


# ---------------------------------------------------------------------------------------
# Histograms


def sparse(dense: torch.Tensor) -> Histogram:
    """The occupied bins of a dense histogram, and their counts."""
    where = dense.nonzero().squeeze(1)
    return where, dense[where]


def merge(parts: list[Histogram], bins: int) -> Histogram:
    """The sum of sparse histograms of values in ``[0, bins)``."""
    if len(parts) == 1:
        return parts[0]
    values = torch.cat([p[0] for p in parts])
    counts = torch.cat([p[1] for p in parts])
    if bins <= DENSE_BINS:
        return sparse(torch.zeros(bins, dtype=torch.int64).index_add_(0, values, counts))
    distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return distinct, torch.zeros(distinct.shape, dtype=torch.int64).index_add_(0, inverse, counts)


def tally(hist: torch.Tensor, values: torch.Tensor) -> None:
    """Add the counts of ``values`` (integers below ``len(hist)``, on any device) to the
    dense histogram ``hist`` (int64, on the CPU)."""
    values = values.reshape(-1)
    if values.numel() >= hist.numel():  # bincount's result is no longer than the block
        hist += torch.bincount(values, minlength=hist.numel()).cpu()
    else:  # only the values' own bins
        values = values.cpu()
        hist.index_add_(0, values, torch.ones(values.shape, dtype=torch.int64))


def locate(hist: Histogram, rank: int) -> tuple[int, int]:
    """The value holding descending rank ``rank`` (0: the largest) of a histogram, and
    how many items lie above it (have a larger value)."""
    values, counts = hist
    ends = torch.cumsum(counts, 0)  # items at or below each value
    n = int(ends[-1])
    i = int(torch.searchsorted(ends, torch.tensor([n - 1 - rank]), right=True)[0])
    return int(values[i]), n - int(ends[i])


# ---------------------------------------------------------------------------------------
# The two statistics


class RadixSelect:
    """The keys of chosen descending ranks (0: the largest key) among all keys of a
    tensor, per selection id, by two statistics named ``coarse_name`` and ``fine_name``.

    ``keys(xb, ids)`` gives ``{id: integer keys}`` of one row block (in ``pass_dtype``,
    default the compute dtype), laid out as ``layout``; ``wanted(ctx)`` the ids that may
    need selecting (from parameters alone); ``ranks(ctx, id, n, nonzero)`` the descending
    ranks to find among the id's ``n`` keys (``nonzero`` of them non-zero, counted only
    with ``count_nonzero``), or ALL / NONE where none needs finding.

    The fine statistic's value is ``{id: ALL | NONE | {"n", "nonzero", "thresholds"}}``,
    with for each target rank, in the order ``ranks`` gave them, ``{"key", "above",
    "prefix"}``: its key, how many keys are larger, and per chunk (by its first row) how
    many keys equal to it lie in the chunks before.

    A coarse partial may already hold fine histograms (``_coarse_chunk`` of a subclass
    that predicts buckets); a chunk whose fine histograms are all known reads no data in
    the fine pass (``Statistic.reads``).
    """

    def __init__(self, coarse_name: str, fine_name: str, layout: KeyLayout,
                 keys: Callable[[ChunkInputs, list], dict], wanted: Callable[[ChunkInputs], list],
                 ranks: Callable[[ChunkInputs, Any, int, int], list[int] | str], count_nonzero: bool = False,
                 pass_dtype: Callable[[ChunkInputs], torch.dtype] | None = None):
        self.coarse_name = coarse_name
        self.fine_name = fine_name
        self.layout = layout
        self.keys = keys
        self.wanted = wanted
        self.ranks = ranks
        self.count_nonzero = count_nonzero  # does ranks() use the number of non-zero keys?
        self.pass_dtype = pass_dtype or compute_dtype  # dtype the selection passes compute keys in

    def statistics(self) -> list[Statistic]:
        def needed(ctx):  # from parameters alone; the fine pass does nothing if coarse settles all
            return bool(self.wanted(ctx))

        return [
            Statistic(self.coarse_name, self._coarse_chunk, self._coarse_combine, self._coarse_finalize, needed),
            Statistic(self.fine_name, self._fine_chunk, self._fine_combine, self._fine_finalize, needed,
                      reads=self._fine_reads),
        ]

    # -- stage 1: buckets -------------------------------------------------------------------

    def _coarse_chunk(self, x: ChunkInputs) -> dict:
        """``{id: (bucket histogram, non-zero keys, {first row: {bucket: fine histogram}})}``
        of one chunk (no fine histograms here: see RankSelect)."""
        ids = self.wanted(x)
        hists = {i: torch.zeros(self.layout.buckets, dtype=torch.int64) for i in ids}
        nonzero = self._count_keys(row_blocks(x, self.pass_dtype(x)), ids, hists, lambda i, k: self.layout.bucket(k))
        return {i: (sparse(hists[i]), nonzero[i], {}) for i in ids}

    def _count_keys(self, blocks: Iterable[ChunkInputs], ids: list, hists: dict,
                    index: Callable[[Any, torch.Tensor], torch.Tensor]) -> dict:
        """Count ``index(id, keys)`` of the blocks' keys into the dense ``hists``; returns
        ``{id: number of non-zero keys}`` (0 without ``count_nonzero``)."""
        nonzero = dict.fromkeys(ids, 0)
        for xb in blocks:
            for i, k in self.keys(xb, ids).items():
                if self.count_nonzero:
                    nonzero[i] += int(torch.count_nonzero(k))
                tally(hists[i], index(i, k.reshape(-1)))
        return nonzero

    def _coarse_combine(self, partials: list[dict]) -> dict:
        out = {}
        for i in partials[0]:
            fine = {}
            for p in partials:
                fine.update(p[i][2])  # one entry per chunk (keyed by its first row)
            out[i] = (merge([p[i][0] for p in partials], self.layout.buckets), sum(p[i][1] for p in partials), fine)
        return out

    def _coarse_finalize(self, combined: dict, ctx: ChunkInputs) -> dict:
        result = {}
        for i, (hist, nonzero, fine) in combined.items():
            n = int(hist[1].sum())
            ranks = self.ranks(ctx, i, n, nonzero)
            if isinstance(ranks, str):
                result[i] = ranks
                continue
            targets = []
            for rank in ranks:
                b, above = locate(hist, rank)
                # the chunks that counted bucket b's fine histogram in the coarse pass
                known = {start: f[b] for start, f in fine.items() if b in f}
                targets.append({"rank": rank, "bin": b, "above": above, "known": known})
            result[i] = {"n": n, "nonzero": nonzero, "targets": targets}
        return result

    # -- stage 2: low bits in the target buckets ---------------------------------------------

    def _fine_plan(self, x: ChunkInputs) -> tuple[dict, dict]:
        """For one chunk: the fine histograms its coarse pass already counted
        (``{(id, bucket): counts}``) and the buckets it must still count (``{id: {bucket}}``).
        Needs only ``x.stats`` and ``x.row_start``."""
        coarse = x.stats.get(self.coarse_name) or {}
        known = {}
        missed = {}
        for i, r in coarse.items():
            if not isinstance(r, dict):
                continue
            for t in r["targets"]:
                if x.row_start in t["known"]:
                    known[(i, t["bin"])] = t["known"][x.row_start]
                elif (i, t["bin"]) not in known:
                    missed.setdefault(i, set()).add(t["bin"])
        return known, missed

    def _fine_reads(self, ctx: ChunkInputs) -> bool:
        """Whether a chunk's fine pass needs its data (a bucket its coarse pass did not count)."""
        return bool(self._fine_plan(ctx)[1])

    def _fine_chunk(self, x: ChunkInputs) -> dict:
        """``{first row: {(id, bucket): fine histogram}}`` of one chunk."""
        counts, missed = self._fine_plan(x)
        if missed:
            counts.update(self._count_fine(row_blocks(x, self.pass_dtype(x)), missed))
        return {x.row_start: counts}

    def _count_fine(self, blocks: Iterable[ChunkInputs], missed: dict) -> dict:
        """``{(id, bucket): histogram of the low bits of the keys in that bucket}`` of the
        blocks, for the buckets ``missed`` (``{id: {bucket}}``)."""
        bins = self.layout.fine_bins
        # Few low bits: count every key, those outside the bucket in two sentinel bins
        # (``key - bucket start + 1`` clamped to [0, bins + 1]), twice as fast as selecting
        # the bucket's keys. Many (float64 keys): select them, and count distinct values.
        dense = bins <= DENSE_BINS
        counts = {(i, b): torch.zeros(bins + 2, dtype=torch.int64) if dense else [] for i, bs in missed.items()
                  for b in bs}
        for xb in blocks:
            for i, k in self.keys(xb, list(missed)).items():
                k = k.reshape(-1)
                if dense:
                    shifted = torch.empty_like(k)
                    for b in missed[i]:
                        tally(counts[(i, b)], torch.sub(k, self.layout.key(b, 0), out=shifted).clamp_(-1, bins).add_(1))
                else:
                    buckets = self.layout.bucket(k)
                    for b in missed[i]:
                        counts[(i, b)].append(self.layout.low(k[buckets == b]).cpu())
        if dense:
            return {key: sparse(c[1:-1]) for key, c in counts.items()}
        return {key: torch.unique(torch.cat(c), sorted=True, return_counts=True) for key, c in counts.items()}

    @staticmethod
    def _fine_combine(partials: list[dict]) -> dict:
        out = {}
        for p in partials:
            out.update(p)  # one entry per chunk (keyed by its first row): order-independent
        return out

    def _fine_finalize(self, per_chunk: dict, ctx: ChunkInputs) -> dict:
        coarse = ctx.stats.get(self.coarse_name) or {}
        starts = sorted(per_chunk)
        result = {}
        for i, r in coarse.items():
            if not isinstance(r, dict):
                result[i] = r
                continue
            thresholds = []
            for t in r["targets"]:
                b = t["bin"]
                hists = [per_chunk[s][(i, b)] for s in starts]
                low, above_in_bin = locate(merge(hists, self.layout.fine_bins), t["rank"] - t["above"])
                prefix, seen = {}, 0
                for s, (values, counts) in zip(starts, hists):  # keys equal to this one in the chunks before
                    prefix[s] = seen
                    hit = (values == low).nonzero()
                    seen += int(counts[hit[0, 0]]) if hit.numel() else 0
                thresholds.append({"key": self.layout.key(b, low), "above": t["above"] + above_in_bin,
                                   "prefix": prefix})
            result[i] = {"n": r["n"], "nonzero": r["nonzero"], "thresholds": thresholds}
        return result


# ---------------------------------------------------------------------------------------
# Order statistics

_VALUES = "values"  # the one selection id of order_statistics


def order_statistics(
    name: str,
    values: Callable[[ChunkInputs], torch.Tensor],
    ranks: Callable[[int, ChunkInputs], list[int]],
    finalize: Callable[[list[float], ChunkInputs], object] | None = None,
) -> list[Statistic]:
    """Two statistics: ``name + "_bins"``, then ``name``: the values of ranks
    ``ranks(n, context)`` (0-based, ascending order) among all ``n`` values
    ``values(xb)`` of the tensor (called on row blocks: elementwise or row-local), or
    ``finalize`` of them."""
    select = RadixSelect(
        name + "_bins", name, FLOAT64_KEYS,
        keys=lambda xb, ids: {_VALUES: sortable_keys(values(xb))},
        wanted=lambda ctx: [_VALUES],
        ranks=lambda ctx, i, n, nonzero: [n - 1 - r for r in ranks(n, ctx)],  # descending
    )
    coarse, fine = select.statistics()

    def found(per_chunk: dict, context: ChunkInputs):
        thresholds = fine.finalize(per_chunk, context)[_VALUES]["thresholds"]
        out = [key_value(t["key"]) for t in thresholds]
        return out if finalize is None else finalize(out, context)

    return [coarse, dataclasses.replace(fine, finalize=found)]
