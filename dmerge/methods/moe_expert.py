"""moe_expert: an expert's MLP tensor in a FrankenMoE, with mergekit-moe's options.

    out = (x + noise_scale * z) * scale,   z ~ N(0, 1) elementwise

``noise_scale`` (an expert's ``noise_scale``) adds Gaussian noise, ``scale`` (its
``residual_scale``, on the down projection only) scales the result. ``z`` comes from the
counter-based generator keyed by (seed, tensor name, element index) and the Box-Muller
transform, so the bytes do not depend on how the tensor is split into chunks. Without
noise and scale the expert tensor is a byte copy (passthrough), which is what
``dmerge moe`` plans then; this method is used only when an expert sets either.
"""

from __future__ import annotations

import math

from dmerge.lazy import torch
from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._sparsify import keyed_uniform, stream_key


def gaussian(seed: int, tensor_name: str, start: int, count: int, device) -> torch.Tensor:
    """Standard normal values for elements ``start .. start + count - 1`` (float64)."""
    u = keyed_uniform(stream_key(seed, tensor_name, 0), 2 * start, 2 * count, device).view(count, 2)
    return torch.sqrt(-2.0 * torch.log1p(-u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])


@merge_method(
    "moe_expert",
    model_params=[Param("noise_scale", default=None, minimum=0.0, doc="standard deviation of the added noise"),
                  Param("scale", default=None, doc="multiply the tensor by this factor (residual_scale)")],
    single_source=True,
    work_tensors=3,
)
def moe_expert(x: ChunkInputs) -> torch.Tensor:
    """An expert tensor with mergekit-moe's noise_scale and residual_scale applied."""
    t = x.tensors[0]
    mp = x.model_params[0]
    noise, scale = mp.get("noise_scale"), mp.get("scale")
    if noise:
        row_numel = t[0].numel() if t.dim() > 1 else 1
        z = gaussian(x.seed, x.tensor_name, x.row_start * row_numel, t.numel(), t.device)
        t = t + noise * z.view(t.shape).to(t.dtype)
    return t if scale is None else t * scale
