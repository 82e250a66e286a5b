"""NearSwap: take the other model's value where it is close to the base model's.

With base ``a``, the other model ``b`` and threshold ``t``, elementwise:

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w * b + (1 - w) * a

Parameters closer than ``t`` are swapped to the other model's value entirely; further
ones move towards it by ``t / |a - b|``, so no element moves by more than ``t``.
``t = 0`` (or negative) keeps the base model.

alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._reduce import blockwise


def _check(params: dict, model_params: list[dict]) -> str | None:
    if len(model_params) != 2:
        return f"nearswap needs exactly two models, the base_model and one other (got {len(model_params)})"
    return None


@merge_method(
    "nearswap",
    requires_base=True,
    params=[Param("t", required=True, doc="distance under which the other model's value is taken")],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    check=_check,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
def nearswap(x: ChunkInputs) -> torch.Tensor:
    """Move each base parameter towards the other model by at most t."""
    t = x.params["t"]

    def combine(xb: ChunkInputs) -> torch.Tensor:
        a, b = xb.base, xb.others[0]
        w = t / (a - b).abs_().clamp_(min=1e-6)
        w.clamp_(0.0, 1.0)
        out = b * w
        out += a * (1 - w)
        return out

    return blockwise(x, combine)
