"""Karcher mean: the Riemannian (geodesic) centre of mass of the models on a hypersphere.

Every source model takes part, with equal weights ``a_i = 1/n``; each tensor is one
vector. With norms ``n_i = |x_i|`` and directions ``u_i = x_i / n_i`` (models with
``n_i <= tol`` take no part in the direction, their weights renormalised away), the
mean direction ``m`` minimises ``sum_i a_i angle(m, u_i)^2``. It is found by the fixed
point iteration, starting from the normalised weighted mean of the ``u_i``:

    g = sum_i a_i * theta_i / sin(theta_i) * (u_i - cos(theta_i) m),  theta_i = angle(m, u_i)
    m <- cos(|g|) m + sin(|g|) g / |g|          (then renormalised)

until ``|g| < tol`` or ``max_iter`` steps. The result is ``(sum_i a_i n_i) * m``.
Terms with ``theta_i < tol`` are skipped (their contribution vanishes).

Every iterate is a linear combination of the ``x_i``, so the whole iteration runs on
coefficient vectors and the Gram matrix ``<x_i, x_j>`` (one exact reduction over all
chunks); no per-iteration pass over the data is needed. Every chunk is then
``sum_i c_i x_i``.

Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math.
30 (1977); mergekit's ``karcher`` cites https://arxiv.org/abs/2603.04972
"""


from __future__ import annotations
import math

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._linalg import matvec, norm
from dmerge.methods._reduce import blockwise, gram_statistic


def _several(context: ChunkInputs) -> bool:
    return len(context.model_params) > 1


def karcher_coefficients(g: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """c such that the Karcher mean is sum_i c_i x_i, given the Gram matrix of the x_i."""
    n = len(g)
    alphas = [1.0 / n] * n
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    s = [1.0 / nv if nv != 0.0 else 0.0 for nv in norms]  # u_i = s_i x_i
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = math.fsum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}

    mean = [a[i] * s[i] if i in a else 0.0 for i in range(n)]
    mean_norm = norm(g, mean)
    if mean_norm < tol:
        mean = [s[i] if i == valid[0] else 0.0 for i in range(n)]
    else:
        mean = [c / mean_norm for c in mean]

    for _ in range(max(0, max_iter)):
        gm = matvec(g, mean)
        terms = []  # (coefficient vector) pieces of the tangent g, summed exactly below
        for i in valid:
            cos = max(-1.0, min(1.0, s[i] * gm[i]))
            theta = math.acos(cos)
            sin = math.sin(theta)
            if theta < tol or sin == 0.0:  # nothing to add, or antipodal: no unique geodesic
                continue
            k = a[i] * theta / sin
            terms.append([k * (s[j] if j == i else 0.0) - k * cos * mean[j] for j in range(n)])
        tangent = [math.fsum(term[j] for term in terms) for j in range(n)]
        tangent_norm = norm(g, tangent)
        if tangent_norm < tol:
            break
        c, sn = math.cos(tangent_norm), math.sin(tangent_norm) / tangent_norm
        mean = [c * mean[j] + sn * tangent[j] for j in range(n)]
        unit_norm = norm(g, mean)
        if unit_norm > tol:
            mean = [m / unit_norm for m in mean]

    scale = math.fsum(al * nv for al, nv in zip(alphas, norms))
    return [scale * m for m in mean]


def _coefficients(g: list[list[float]], context: ChunkInputs) -> list[float]:
    return karcher_coefficients(g, context.params["max_iter"], context.params["tol"])


@merge_method(
    "karcher",
    params=[
        Param("max_iter", kind=int, default=10, doc="most fixed-point iterations"),
        Param("tol", default=1e-5, minimum=0, doc="stop when the tangent step is shorter than this"),
    ],
    statistics=[gram_statistic("karcher", lambda x: list(x.tensors), _coefficients, when=_several)],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    reference="https://arxiv.org/abs/2603.04972",
)
def karcher(x: ChunkInputs) -> torch.Tensor:
    """Geodesic mean of the directions of all models, scaled by their mean norm."""
    if not _several(x):
        return x.tensors[0]
    coefficients = x.stats["karcher"]

    def combine(xb: ChunkInputs) -> torch.Tensor:
        out = torch.zeros_like(xb.tensors[0])
        for c, t in zip(coefficients, xb.tensors):
            out += t * c
        return out

    return blockwise(x, combine)
