"""Linear merge ("model soup"): a weighted average of the parents.

    out = sum_i w_i x_i / sum_i w_i      (normalize: true, the default)
    out = sum_i w_i x_i                  (normalize: false)

The sum is taken in source order, each product and sum rounded in the compute dtype,
then divided by the weights' sum, and rounded once to the output dtype (see
dmerge/methods/_weighted.py; on the CPU it runs in the fused C kernel).

Wortsman et al., "Model soups", https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from dmerge.lazy import torch
from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._weighted import weighted_sum


def _check(params: dict, model_params: list[dict]) -> str | None:
    if params["normalize"] and sum(p["weight"] for p in model_params) == 0:
        return "linear with normalize: true needs weights that do not sum to 0"
    return None


@merge_method(
    "linear",
    params=[Param("normalize", kind=bool, default=True, doc="divide by the sum of weights")],
    model_params=[Param("weight", required=True, doc="coefficient of this model")],
    check=_check,
    raw_inputs=True,  # widened block by block (or in the C kernel), rounded as each block is done
    work_tensors=0,  # so no chunk-sized temporary
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(x: ChunkInputs) -> torch.Tensor:
    """Weighted sum of all sources (the base model too, if it has a weight)."""
    weights = [p["weight"] for p in x.model_params]
    return weighted_sum(x, weights, sum(weights) if x.params["normalize"] else None)
