"""Exact order statistics (the k-th smallest value) of a tensor split into chunks.

No sorting of the whole tensor and no sampling: two passes of a radix select over the
float64 bit patterns, each a reduction of small per-chunk partials with an exact
(integer) combine, so the result is the same however the tensor was chunked.

1. Every chunk counts its values per *bin*: the top 20 bits of the order-preserving
   integer key of each value (sign, exponent and 8 mantissa bits: 256 bins per binade).
   The summed counts tell which bin holds the k-th value, and its rank inside the bin.
2. Every chunk lists the distinct values in those bins, with their multiplicity. The
   merged list gives the k-th value exactly.

Partials are sparse (only occupied bins, only values in the chosen bins), so they stay
small next to the tensor.
"""

from __future__ import annotations

from typing import Callable

import torch

from dmerge.methods.base import ChunkInputs, Statistic

_SHIFT = 44  # keep the top 64 - 44 = 20 bits
_BINS = 1 << 20
_LOW63 = 0x7FFFFFFFFFFFFFFF


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the float64 values are (-0.0 just below +0.0; no NaN)."""
    bits = values.to(torch.float64).contiguous().view(torch.int64)
    return bits ^ ((bits >> 63) & _LOW63)


def key_value(key: int) -> float:
    bits = key ^ (_LOW63 if key < 0 else 0)
    return torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()


def _bins(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> _SHIFT) + (_BINS >> 1)


def _bin_counts(bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupied bins (sorted) and how many values each holds."""
    if bins.numel() > _BINS:  # counting beats sorting
        counts = torch.bincount(bins, minlength=_BINS)
        where = counts.nonzero().squeeze(1)
        return where, counts[where]
    return torch.unique(bins, sorted=True, return_counts=True)


def _merge(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([p[0] for p in pairs])
    counts = torch.cat([p[1] for p in pairs])
    distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return distinct, torch.zeros(distinct.shape, dtype=torch.int64).index_add_(0, inverse, counts)


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """Index of the entry holding the ``rank``-th item (0-based), and the rank inside it."""
    ends = torch.cumsum(counts, 0)
    i = int(torch.searchsorted(ends, torch.tensor([rank]), right=True)[0])
    before = int(ends[i - 1]) if i else 0
    return i, rank - before


def order_statistics(
    name: str,
    values: Callable[[ChunkInputs], torch.Tensor],
    ranks: Callable[[int, ChunkInputs], list[int]],
    finalize: Callable[[list[float], ChunkInputs], object] | None = None,
) -> list[Statistic]:
    """Two statistics: ``name + "_bins"``, then ``name``: the values of ranks
    ``ranks(n, context)`` (0-based, ascending order) among all ``n`` values
    ``values(x)`` of the tensor, or ``finalize`` of them."""
    bins_name = name + "_bins"

    def bins_chunk(x: ChunkInputs):
        bins, counts = _bin_counts(_bins(sortable_keys(values(x).reshape(-1))))
        return bins.cpu(), counts.cpu()

    def bins_final(merged, context: ChunkInputs):
        bins, counts = merged
        n = int(counts.sum())
        targets = []
        for rank in ranks(n, context):
            i, inside = _locate(counts, rank)
            targets.append((int(bins[i]), inside))
        return targets

    def values_chunk(x: ChunkInputs):
        keys = sortable_keys(values(x).reshape(-1))
        bins = _bins(keys)
        out = {}
        for b, _ in x.stats[bins_name]:
            if b not in out:
                out[b] = tuple(t.cpu() for t in torch.unique(keys[bins == b], sorted=True, return_counts=True))
        return out

    def values_combine(partials: list[dict]):
        return {b: _merge([p[b] for p in partials]) for b in partials[0]}

    def values_final(merged: dict, context: ChunkInputs):
        found = []
        for b, inside in context.stats[bins_name]:
            keys, counts = merged[b]
            i, _ = _locate(counts, inside)
            found.append(key_value(int(keys[i])))
        return found if finalize is None else finalize(found, context)

    return [
        Statistic(bins_name, chunk=bins_chunk, combine=_merge, finalize=bins_final),
        Statistic(name, chunk=values_chunk, combine=values_combine, finalize=values_final),
    ]
