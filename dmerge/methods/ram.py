"""RAM (Reinforced Agent Merging): average task vectors only where models changed them.

With task vectors ``tau_i = x_i - base``, a model contributes to a parameter where
``|tau_i| > epsilon``. Elementwise, with ``count`` contributors:

    out = base + (sum of contributing tau_i) / count        (base where count = 0)

A change made by one model alone is kept whole (not diluted by the models that left
the parameter alone, as plain averaging would); shared changes are averaged.

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._ram import contributions
from dmerge.methods._reduce import blockwise


@merge_method(
    "ram",
    requires_base=True,
    params=[Param("epsilon", default=1e-5, minimum=0, doc="a task vector element counts when larger than this")],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    reference="https://arxiv.org/abs/2601.13572",
)
def ram(x: ChunkInputs) -> torch.Tensor:
    """base + the mean of the task vector elements that are not (near) zero."""
    if not x.others:
        return x.base
    epsilon = x.params["epsilon"]

    def combine(xb: ChunkInputs) -> torch.Tensor:
        taus, _, count = contributions(xb, epsilon)
        total = taus[0]
        for tau in taus[1:]:
            total += tau
        total /= count.clamp_(min=1)
        return total.add_(xb.base)

    return blockwise(x, combine)
