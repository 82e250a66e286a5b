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
flat index), the mean squares by split-independent row-tree sums: both are tensor-wide
statistics.

Tang et al., "SCE: Select, Calculate, and Erase", https://arxiv.org/abs/2408.07990
"""

from __future__ import annotations

import math
from typing import Iterator

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, Statistic, merge_method
from dmerge.methods._reduce import chunk_partial, compute_dtype, row_blocks, row_sums, tree_combine, tree_total
from dmerge.methods._sparsify import ALL, NONE, RankSelect, block_task_vectors, magnitude_key, non_base_indices

VAR = "variance"


def _variance(tvs: list[torch.Tensor]) -> torch.Tensor:
    mean = tvs[0].clone()
    for t in tvs[1:]:
        mean.add_(t)
    mean.div_(len(tvs))
    var = torch.zeros_like(mean)
    for t in tvs:
        d = t - mean
        var.add_(d.mul_(d))
    return var.div_(len(tvs))


def _variance_key(xb: ChunkInputs, _ids) -> dict:
    """Keys of the population variance across the task vectors, for one row block."""
    return {VAR: magnitude_key(_variance(list(block_task_vectors(xb, non_base_indices(xb)).values())))}


def _wanted(ctx: ChunkInputs) -> list:
    topk = ctx.params["select_topk"]
    return [VAR] if 0 < topk < 1 and non_base_indices(ctx) and math.prod(ctx.full_shape) > 0 else []


def _window(ctx: ChunkInputs, _id, n: int, nonzero: int) -> tuple[int, int]:
    return 0, int(nonzero * ctx.params["select_topk"])


_variance_select = RankSelect("sce_select", _variance_key, _wanted, _window, count_nonzero=True)


def _selected_blocks(x: ChunkInputs) -> Iterator[tuple[ChunkInputs, dict]]:
    """Each row block with its task vectors, the selection applied."""
    topk = x.params["select_topk"]
    idx = non_base_indices(x)
    select = _variance_select.masker(x, VAR) if 0 < topk < 1 else (lambda keys: ALL if topk >= 1 else NONE)
    for xb in row_blocks(x):
        tvs = block_task_vectors(xb, idx)
        keep = select(magnitude_key(_variance(list(tvs.values())))) if 0 < topk < 1 else select(None)
        if keep is NONE:
            for t in tvs.values():
                t.zero_()
        elif keep is not ALL:
            for t in tvs.values():
                t.mul_(keep)
        yield xb, tvs


def _weights_chunk(x: ChunkInputs):
    return chunk_partial(x, ((xb, torch.stack([row_sums(t.square()) for t in tvs.values()], dim=1))
                             for xb, tvs in _selected_blocks(x)))


def _weights_finalize(partial, ctx: ChunkInputs) -> dict:
    n = math.prod(ctx.full_shape)
    sums = tree_total(partial).tolist()
    means = {i: v / n for i, v in zip(non_base_indices(ctx), sums)}
    total = sum(means.values())
    if abs(total) < 1e-6:  # as mergekit: (near-)zero task vectors weigh equally
        return {i: 1.0 / len(means) for i in means}
    return {i: m / total for i, m in means.items()}


_weights = Statistic("sce_weights", _weights_chunk, tree_combine, _weights_finalize,
                     when=lambda ctx: bool(non_base_indices(ctx)) and math.prod(ctx.full_shape) > 0)


@merge_method(
    "sce",
    requires_base=True,
    params=[
        Param("select_topk", default=1.0, minimum=0.0, maximum=1.0,
              doc="fraction of elements (by variance across models) kept"),
        Param("int8_mask", kind=bool, default=False, doc="accepted for compatibility; no effect"),
    ],
    statistics=[*_variance_select.statistics(), _weights],
    work_tensors=1,
    raw_inputs=True,
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(x: ChunkInputs) -> torch.Tensor:
    """Select high-variance elements, weight task vectors by mean square, erase minority signs."""
    idx = non_base_indices(x)
    dtype = compute_dtype(x)
    if not idx:
        return x.base.to(dtype)
    weights = x.stats["sce_weights"]
    out = torch.empty(x.base.shape, dtype=dtype, device=x.base.device)
    flat_out = out.view(-1)
    at = 0
    for xb, tvs in _selected_blocks(x):
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
        n = merged.numel()
        torch.add(xb.base.reshape(-1), merged.reshape(-1), out=flat_out[at: at + n])
        at += n
    return out
