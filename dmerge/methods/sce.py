"""SCE: select, calculate, erase.

    tau_i = x_i - base                      (every non-base model; no per-model weights)
    select: with select_topk < 1, keep only the k = int(m * select_topk) elements of
            largest variance across the tau_i (population variance; m = elements with
            non-zero variance, over the whole tensor); tau_i *= that mask
    calculate: c_i = mean(tau_i^2) over the whole tensor, normalized to sum 1
               (1 / N each when the sum is below 1e-6)
    erase: agree_i = sign(tau_i) == elected sign of sum_j tau_j (zero has no sign)
    out = base + sum_i agree_i c_i tau_i / max(sum_i agree_i c_i, 1e-6)

Parameters: select_topk (default 1: no selection), int8_mask (no effect). The variance
threshold is found by radix select over the float32 rounding of the variance (ties by
flat index), the mean squares by exact sums: both are tensor-wide statistics.

Tang et al., "SCE: Select, Calculate, and Erase", https://arxiv.org/abs/2408.07990
"""

from __future__ import annotations

import math

import torch

from dmerge.methods import ChunkInputs, Param, Statistic, merge_method
from dmerge.methods._sparsify import (
    ALL, NONE, RankSelect, cache, exact_sum_combine, exact_sum_partial, exact_sum_value, magnitude_key, non_base_indices,
    task_vectors,
)

VAR = "variance"


def _variance_key(x: ChunkInputs, _id, start: int, stop: int) -> torch.Tensor:
    """Keys of the population variance across task vectors, flat elements [start, stop)."""
    tvs = [t.reshape(-1)[start:stop] for t in task_vectors(x).values()]
    mean = tvs[0].clone()
    for t in tvs[1:]:
        mean.add_(t)
    mean.div_(len(tvs))
    var = torch.zeros_like(mean)
    for t in tvs:
        d = t - mean
        var.add_(d.mul_(d))
    var.div_(len(tvs))
    return magnitude_key(var)


def _wanted(ctx: ChunkInputs) -> list:
    topk = ctx.params["select_topk"]
    return [VAR] if 0 < topk < 1 and non_base_indices(ctx) and math.prod(ctx.full_shape) > 0 else []


def _window(ctx: ChunkInputs, _id, n: int, nonzero: int) -> tuple[int, int]:
    return 0, int(nonzero * ctx.params["select_topk"])


_select = RankSelect("sce_select", _variance_key, _wanted, _window, count_nonzero=True)


def _selection(x: ChunkInputs):
    """ALL, NONE or the boolean mask of selected elements of this chunk."""
    topk = x.params["select_topk"]
    if topk >= 1:
        return ALL
    if topk <= 0:
        return NONE
    keep = _select.mask(x, VAR)
    return keep if isinstance(keep, str) else keep.view(x.base.shape)


def _selected_task_vectors(x: ChunkInputs) -> dict:
    """Task vectors with the selection applied (once per chunk, in place)."""
    c = cache(x)
    tvs = task_vectors(x)
    if not c.get("sce_selected"):
        sel = _selection(x)
        if isinstance(sel, str):
            if sel == NONE:
                for t in tvs.values():
                    t.zero_()
        else:
            drop = sel.logical_not_()
            for t in tvs.values():
                t.masked_fill_(drop, 0.0)
        c["sce_selected"] = True
    return tvs


def _weights_chunk(x: ChunkInputs) -> dict:
    return {i: exact_sum_partial(t, square=True) for i, t in _selected_task_vectors(x).items()}


def _weights_combine(partials: list[dict]) -> dict:
    return {i: exact_sum_combine([p[i] for p in partials]) for i in partials[0]}


def _weights_finalize(combined: dict, ctx: ChunkInputs) -> dict:
    n = math.prod(ctx.full_shape)
    means = {i: exact_sum_value(s) / n for i, s in combined.items()}
    total = sum(means.values())
    if abs(total) < 1e-6:  # as mergekit: (near-)zero task vectors weigh equally
        return {i: 1.0 / len(means) for i in means}
    return {i: m / total for i, m in means.items()}


_weights = Statistic("sce_weights", _weights_chunk, _weights_combine, _weights_finalize,
                     when=lambda ctx: bool(non_base_indices(ctx)) and math.prod(ctx.full_shape) > 0)


@merge_method(
    "sce",
    requires_base=True,
    params=[
        Param("select_topk", default=1.0, minimum=0.0, maximum=1.0,
              doc="fraction of elements (by variance across models) kept"),
        Param("int8_mask", kind=bool, default=False, doc="accepted for compatibility; no effect"),
    ],
    statistics=[*_select.statistics(), _weights],
    work_tensors=2,
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(x: ChunkInputs) -> torch.Tensor:
    """Select high-variance elements, weight task vectors by mean square, erase minority signs."""
    base = x.base
    idx = non_base_indices(x)
    if not idx:
        return base
    tvs = _selected_task_vectors(x)
    weights = x.stats["sce_weights"]
    total = tvs[idx[0]].clone()
    for i in idx[1:]:
        total.add_(tvs[i])
    positive = total >= 0
    merged = total.zero_()
    denom = torch.zeros_like(merged)
    for i in idx:
        t = tvs[i]
        agree = torch.where(positive, t > 0, t < 0)
        c = agree.to(t.dtype).mul_(weights[i])
        merged.add_(t.mul_(c))
        denom.add_(c)
    merged.div_(denom.clamp_(min=1e-6))
    return merged.add_(base)
