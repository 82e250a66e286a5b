"""Task arithmetic: add (or, with negative weights, subtract) task vectors to the base.

    tau_i = x_i - base
    out   = base + lambda * sum_i w_i tau_i [/ sum_i w_i if normalize]

A negative ``weight`` removes a capability ("forgetting via negation").
Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089
"""

import torch

from dmerge.methods import ChunkInputs, Param, merge_method


@merge_method(
    "task_arithmetic",
    requires_base=True,
    params=[
        Param("normalize", kind=bool, default=False, doc="divide the summed task vector by sum of weights"),
        Param("lambda", default=1.0, doc="scale of the summed task vector"),
        Param("int8_mask", kind=bool, default=False, doc="accepted for compatibility; no effect"),
        Param("rescale", kind=bool, default=False, doc="accepted for compatibility; no effect without sparsification"),
    ],
    model_params=[Param("weight", required=True, for_base=False, doc="coefficient of this model's task vector")],
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(x: ChunkInputs) -> torch.Tensor:
    """base + lambda * weighted sum of (model - base)."""
    base = x.base
    weights = [p["weight"] for p in x.others_params]
    delta = torch.zeros_like(base)
    for w, t in zip(weights, x.others):
        delta.add_(t - base, alpha=w)
    if x.params["normalize"]:
        total = sum(weights)
        if abs(total) >= 1e-8:  # as mergekit: a (near-)zero divisor is treated as 1
            delta.div_(total)
    if x.params["lambda"] != 1:
        delta.mul_(x.params["lambda"])
    return base + delta
