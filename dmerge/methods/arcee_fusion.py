"""Arcee Fusion: take the other model's value only where it changed the most, by a
tensor-wide outlier threshold on an importance score.

With base ``b`` and the other model ``x`` (exactly two models), elementwise:

    p, q       = softmax(x) + 1e-8, softmax(b) + 1e-8      along the last dimension
    kl         = sum over the last dimension of p * log(p / q)   (one per row)
    importance = |x - b| * kl
    threshold  = median + 1.5 * (q3 - q1)                 of all importances of the tensor
    out        = x where importance >= threshold, else b

The quartiles are order statistics of the whole tensor (0-based ranks
``floor(q (n - 1))`` for q = 0.25, 0.5, 0.75), found exactly over chunks by a radix
select (``_select``): two small reductions, no sort of the tensor. mergekit sorts the
scores, and for tensors of more than 10^6 elements a random sample of 10^6 of them
(its output then depends on the random state); ours is exact and deterministic.

Arcee AI (introduced in mergekit; no paper), https://arcee.ai
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, merge_method
from dmerge.methods._reduce import as_float64, blockwise, lastdim_sum
from dmerge.methods._select import order_statistics

SOFTMAX_EPS = 1e-8


def _softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.amax(dim=-1, keepdim=True))
    return e / lastdim_sum(e).unsqueeze(-1)


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|other - base| times the KL divergence of their softmaxes, per last-dim vector."""
    base, other = as_float64(base), as_float64(other)
    p = _softmax(other) + SOFTMAX_EPS
    q = _softmax(base) + SOFTMAX_EPS
    kl = lastdim_sum(p * torch.log(p / q)).unsqueeze(-1)
    del p, q
    return (other - base).abs_().mul_(kl)


def _importance(x: ChunkInputs) -> torch.Tensor:
    return blockwise(x, lambda xb: importance(xb.base, xb.others[0]))


def _quartile_ranks(n: int, context: ChunkInputs) -> list[int]:
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def _threshold(quartiles: list[float], context: ChunkInputs) -> float:
    q1, median, q3 = quartiles
    return median + 1.5 * (q3 - q1)


def _check(params: dict, model_params: list[dict]) -> str | None:
    if len(model_params) != 2:
        return f"arcee_fusion needs exactly two models, the base_model and one other (got {len(model_params)})"
    return None


@merge_method(
    "arcee_fusion",
    requires_base=True,
    statistics=order_statistics("arcee_fusion", _importance, _quartile_ranks, _threshold),
    work_tensors=4,
    raw_inputs=True,
    check=_check,
    reference="https://arcee.ai",
)
def arcee_fusion(x: ChunkInputs) -> torch.Tensor:
    """The other model's values whose importance is an upper outlier; the base's elsewhere."""
    threshold = x.stats["arcee_fusion"]

    def combine(xb: ChunkInputs) -> torch.Tensor:
        keep = importance(xb.base, xb.others[0]) >= threshold
        return torch.where(keep, xb.others[0], xb.base)

    return blockwise(x, combine)
