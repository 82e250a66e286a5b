"""RAM+ (tensor-local): RAM, with changes unique to one model amplified when that model
also shares many changes with others.

As RAM (see ``ram``), plus, per model ``i`` and over the whole tensor:

    shared_i = number of elements where model i contributes and others do too
    unique_i = number of elements where model i is the only contributor
    lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)

    out = base + tau_i * lambda_i                   where model i alone contributes
          base + (sum of contributing tau_i) / count where several do
          base                                      where none does

The counts are tensor-wide: integers summed over chunks (exact). The "tl" is for
tensor-local: the rescaling is computed per tensor, not over the whole model.

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, Statistic, merge_method
from dmerge.methods._ram import contributions
from dmerge.methods._reduce import blockwise, row_blocks


def _counts(x: ChunkInputs) -> list[tuple[int, int]]:
    """(shared_i, unique_i) over this chunk, for every non-base model."""
    parts = []
    for xb in row_blocks(x):
        _, masks, count = contributions(xb, x.params["epsilon"])
        shared, unique = count > 1, count == 1
        parts.append([(int((m & shared).sum()), int((m & unique).sum())) for m in masks])
    return _sum_counts(parts)


def _sum_counts(partials: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    return [(sum(p[i][0] for p in partials), sum(p[i][1] for p in partials)) for i in range(len(partials[0]))]


def _lambdas(counts: list[tuple[int, int]], context: ChunkInputs) -> list[float]:
    r, alpha, eps = context.params["r"], context.params["alpha"], context.params["epsilon"]
    return [1 + r * min(max(shared / max(unique, eps), 0.0), alpha) for shared, unique in counts]


@merge_method(
    "ramplus_tl",
    requires_base=True,
    params=[
        Param("r", default=0.1, doc="strength of the amplification of unique changes"),
        Param("alpha", default=0.2, doc="cap on the shared/unique ratio"),
        Param("epsilon", default=1e-5, minimum=0, doc="a task vector element counts when larger than this"),
    ],
    statistics=[Statistic("ramplus_counts", chunk=_counts, combine=_sum_counts, finalize=_lambdas,
                          when=lambda c: len(c.model_params) > 1)],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    reference="https://arxiv.org/abs/2601.13572",
)
def ramplus_tl(x: ChunkInputs) -> torch.Tensor:
    """RAM with each model's unique changes scaled by 1 + r * min(shared/unique, alpha)."""
    if not x.others:
        return x.base
    epsilon, lambdas = x.params["epsilon"], x.stats["ramplus_counts"]

    def combine(xb: ChunkInputs) -> torch.Tensor:
        taus, _, count = contributions(xb, epsilon)
        total = torch.zeros_like(xb.base)
        scaled = torch.zeros_like(xb.base)
        for tau, lam in zip(taus, lambdas):
            total += tau
            scaled += tau * lam
        unique = count == 1
        total /= count.clamp_(min=1)
        return torch.where(unique, scaled, total).add_(xb.base)

    return blockwise(x, combine)
