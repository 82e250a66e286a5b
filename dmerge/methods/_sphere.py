"""Interpolation by angle, shared by slerp and nuslerp.

For two vectors ``v0, v1`` at angle ``theta`` (``cos theta = <v0, v1> / (|v0| |v1|)``)
spherical interpolation is

    out = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

It reduces to ``v0`` at t = 0 and ``v1`` at t = 1 exactly. Where the vectors are
(nearly) parallel or antiparallel the ratio is ill-conditioned; callers then ask for the
linear coefficients ``1 - t, t``.

Everything is a float64 tensor of any shape (0-d for whole-tensor angles), so the same
function serves whole tensors, rows and columns.
"""

from __future__ import annotations

from dmerge.lazy import torch


def slerp_coefficients(t: float, cos: torch.Tensor, linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(c0, c1)`` of ``v0`` and ``v1``; ``(1 - t, t)`` where ``linear``."""
    theta = torch.acos(torch.where(linear, 0.0, cos))  # no 0/0 on the linear branch
    sin = torch.where(linear, 1.0, torch.sin(theta))
    c0 = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(linear, float(t), torch.sin(t * theta) / sin)
    return c0, c1


def scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)
