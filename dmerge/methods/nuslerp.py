"""NuSLERP: spherical interpolation of two models, optionally of their task vectors.

With weights ``w0, w1`` of the two (non-base) models, ``t = w1 / (w0 + w1)`` (0.5 when
the weights sum to less than 1e-6 in magnitude). With a base model the task vectors
``v_i = x_i - base`` are interpolated and the base added back; without one, the models'
tensors themselves:

    out = [base +] sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

``theta`` is the angle between ``v0`` and ``v1``, taken (``nuslerp_flatten: true``, the
default) over the whole tensor; with ``nuslerp_flatten: false`` per vector along the last
dimension (each row of a matrix) or, with ``nuslerp_row_wise: true``, along the first
dimension (each column of a matrix). Exactly parallel vectors (1 - cos^2 <= 1e-16)
are interpolated linearly. Norms are floored at 1e-7, so a zero vector is orthogonal
to everything.

Whole-tensor and column angles need every row: their inner products are reduced over
all chunks first (exactly, see ``_reduce``). Row angles are computed inside the chunk.
mergekit's "NuSLERP" (mergekit.merge_methods.nuslerp).
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._reduce import as_float64, blockwise, compute_dtype, gram_statistic, lastdim_sum, row_total_statistic
from dmerge.methods._sphere import scalar, slerp_coefficients

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def _t(x: ChunkInputs) -> float:
    w0, w1 = (p["weight"] for p in x.others_params)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _vectors(x: ChunkInputs) -> list[torch.Tensor]:
    v0, v1 = x.others
    if x.base_index is None:
        return [v0, v1]
    return [v0 - x.base, v1 - x.base]


def _coefficients(t: float, g00, g11, g01) -> tuple[torch.Tensor, torch.Tensor]:
    n0 = torch.sqrt(g00).clamp(min=NORM_FLOOR)
    n1 = torch.sqrt(g11).clamp(min=NORM_FLOOR)
    cos = (g01 / (n0 * n1)).clamp(-1.0, 1.0)
    return slerp_coefficients(t, cos, (1 - cos * cos) <= COLINEAR_EPS**2)


def _flatten(x: ChunkInputs) -> bool:
    return x.params["nuslerp_flatten"]


def _columns(x: ChunkInputs) -> bool:
    return not x.params["nuslerp_flatten"] and x.params["nuslerp_row_wise"] and len(x.full_shape) > 1


def _whole(g: list[list[float]], context: ChunkInputs) -> tuple[float, float]:
    c0, c1 = _coefficients(_t(context), scalar(g[0][0]), scalar(g[1][1]), scalar(g[0][1]))
    return c0.item(), c1.item()


def _column_products(x: ChunkInputs) -> torch.Tensor:
    v0, v1 = (as_float64(v) for v in _vectors(x))
    return torch.stack([v0 * v0, v1 * v1, v0 * v1], dim=-1)  # [rows, ..., 3]


def _column_coefficients(total: torch.Tensor, context: ChunkInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return _coefficients(_t(context), total[..., 0], total[..., 1], total[..., 2])


def _check(params: dict, model_params: list[dict]) -> str | None:
    # the base model's weight is None: it is not one of the two interpolated models
    n = sum(p["weight"] is not None for p in model_params)
    if n != 2:
        return f"nuslerp needs exactly two models besides the base_model (got {n})"
    return None


@merge_method(
    "nuslerp",
    params=[
        Param("nuslerp_flatten", kind=bool, default=True, doc="one angle for the whole tensor"),
        Param("nuslerp_row_wise", kind=bool, default=False,
              doc="without flatten: angles between columns (vectors along the first dimension) instead of rows"),
    ],
    model_params=[Param("weight", required=True, for_base=False, doc="relative weight; t = w1 / (w0 + w1)")],
    statistics=[
        gram_statistic("nuslerp", _vectors, _whole, when=_flatten),
        row_total_statistic("nuslerp_columns", _column_products, _column_coefficients, when=_columns),
    ],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    check=_check,
)
def nuslerp(x: ChunkInputs) -> torch.Tensor:
    """Spherical interpolation of two models (or their task vectors) with t = w1 / (w0 + w1)."""
    dtype = compute_dtype(x)
    if _flatten(x):
        coefficients = x.stats["nuslerp"]
    elif _columns(x):
        coefficients = tuple(c.to(device=x.tensors[0].device, dtype=dtype) for c in x.stats["nuslerp_columns"])
    else:
        coefficients = None  # per vector along the last dimension, inside each row block

    def combine(xb: ChunkInputs) -> torch.Tensor:
        v0, v1 = _vectors(xb)
        if coefficients is None:
            a, b = as_float64(v0), as_float64(v1)
            g00, g11, g01 = (lastdim_sum(p * q).unsqueeze(-1) for p, q in ((a, a), (b, b), (a, b)))
            c0, c1 = (c.to(dtype) for c in _coefficients(_t(xb), g00, g11, g01))
        else:
            c0, c1 = coefficients
        out = v0 * c0
        out += v1 * c1
        if xb.base_index is not None:
            out += xb.base
        return out

    return blockwise(x, combine)

