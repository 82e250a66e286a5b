"""SLERP: spherical linear interpolation between the base model and one other model.

Each tensor is treated as one vector (all its elements). With ``a`` the base model's
tensor, ``b`` the other's and ``theta`` the angle between them:

    out = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

``t = 0`` gives the base model, ``t = 1`` the other. Where the tensors are nearly
parallel or antiparallel (``|cos theta| > 0.9995``) this is ``(1 - t) a + t b``. A tensor
of norm <= 1e-8 has dot product 0 with anything: it counts as orthogonal, as in mergekit.

The angle needs the whole tensor: ``<a, a>``, ``<b, b>`` and ``<a, b>`` are reduced over
all chunks first (exactly, see ``_reduce``), then every chunk is the same linear
combination of its rows of ``a`` and ``b``.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242
"""

from __future__ import annotations

import math

from dmerge.lazy import torch
from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._reduce import gram_statistic
from dmerge.methods._sphere import scalar, slerp_coefficients
from dmerge.methods._weighted import weighted_sum

DOT_THRESHOLD = 0.9995  # above this |cos theta|, interpolate linearly
NORM_EPS = 1e-8  # a norm at most this counts as zero


def _pair(x: ChunkInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return x.base, x.others[0]


def _coefficients(g: list[list[float]], context: ChunkInputs) -> tuple[float, float]:
    t = context.params["t"]
    na, nb = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    cos = max(-1.0, min(1.0, g[0][1] / (na * nb)))
    c0, c1 = slerp_coefficients(t, scalar(cos), torch.tensor(abs(cos) > DOT_THRESHOLD))
    return c0.item(), c1.item()


def _check(params: dict, model_params: list[dict]) -> str | None:
    if len(model_params) != 2:
        return f"slerp needs exactly two models, the base_model and one other (got {len(model_params)})"
    return None


@merge_method(
    "slerp",
    requires_base=True,
    params=[Param("t", required=True, doc="interpolation factor: 0 = base model, 1 = the other model")],
    statistics=[gram_statistic("slerp", lambda x: list(_pair(x)), _coefficients, sources=True)],
    work_tensors=0,  # no chunk-sized temporary: rows are rounded to the output as each block is done
    raw_inputs=True,
    check=_check,
    reference="https://doi.org/10.1145/325165.325242",
)
def slerp(x: ChunkInputs) -> torch.Tensor:
    """Spherical interpolation of the whole tensor between base (t=0) and the other model (t=1)."""
    ca, cb = x.stats["slerp"]
    # a * ca + b * cb, each product and the sum rounded in float64, then once to the
    # output dtype, block by block (or in the fused kernel)
    return weighted_sum(x, [ca, cb], None, list(_pair(x)))
