"""Linear merge ("model soup"): a weighted average of the parents.

    out = sum_i w_i x_i / sum_i w_i      (normalize: true, the default)
    out = sum_i w_i x_i                  (normalize: false)

Wortsman et al., "Model soups", https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method


def _check(params: dict, model_params: list[dict]) -> str | None:
    if params["normalize"] and sum(p["weight"] for p in model_params) == 0:
        return "linear with normalize: true needs weights that do not sum to 0"
    return None


@merge_method(
    "linear",
    params=[Param("normalize", kind=bool, default=True, doc="divide by the sum of weights")],
    model_params=[Param("weight", required=True, doc="coefficient of this model")],
    check=_check,
    elementwise=True,
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(x: ChunkInputs) -> torch.Tensor:
    """Weighted sum of all sources (the base model too, if it has a weight)."""
    weights = [p["weight"] for p in x.model_params]
    out = x.tensors[0] * weights[0]
    for w, t in zip(weights[1:], x.tensors[1:]):
        out.add_(t, alpha=w)
    if x.params["normalize"]:
        out.div_(sum(weights))
    return out
