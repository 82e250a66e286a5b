"""Multi-SLERP: barycentric interpolation of several models on a hypersphere.

With task vectors ``v_i = x_i - base`` (or the models' tensors ``x_i`` without a base
model), weights ``w_i`` (divided by their sum with ``normalize_weights: true``) and
``u_i = v_i / (|v_i| + eps)``, each tensor taken as one vector:

    m   = sum_i w_i u_i / |sum_i w_i u_i|               weighted mean direction
    g   = sum_i w_i (u_i - <u_i, m> m)                  mean in the tangent space at m
    r   = |g| + eps
    out = [base +] (sum_i w_i |v_i|) (cos(r) m + sin(r) / r * g)

i.e. the weighted average of the unit vectors, taken in the tangent space at their
(normalised) Euclidean mean and mapped back onto the sphere, then scaled by the
weighted average norm. One model alone is returned as it is.

Everything above is a linear combination of the ``v_i``, so only their Gram matrix
(``<v_i, v_j>`` over the whole tensor, reduced exactly over chunks) is needed; the
coefficients follow in float64 and every chunk is then ``base + sum_i c_i v_i``.

When the weighted mean direction vanishes (``|sum w_i u_i| < eps``: all task vectors
zero, or opposite ones with balancing weights), the result is the linear combination
``base + sum_i w_i v_i``. mergekit does this for two models and raises an error for
more; we give every model count the same, finite answer.

Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea
"""


from __future__ import annotations
import math

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._linalg import matvec, norm
from dmerge.methods._reduce import blockwise, gram_statistic


def _vectors(x: ChunkInputs):
    """The task vectors (or tensors, without a base model), made one at a time."""
    if x.base_index is None:
        return iter(x.tensors)
    return (t - x.base for t in x.others)


def _weights(context: ChunkInputs) -> list[float]:
    w = [p["weight"] for p in context.others_params]
    if context.params["normalize_weights"]:
        total = sum(w)
        w = [v / total for v in w]
    return w


def _several(context: ChunkInputs) -> bool:
    return len(context.others_params) > 1


def _coefficients(g: list[list[float]], context: ChunkInputs) -> list[float]:
    """c such that out = [base +] sum_i c_i v_i."""
    eps = context.params["eps"]
    w = _weights(context)
    n = len(w)
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    s = [1.0 / (nv + eps) for nv in norms]  # u_i = s_i v_i
    mean = [w[i] * s[i] for i in range(n)]
    mean_norm = norm(g, mean)
    if mean_norm < eps:
        return w  # no mean direction: linear combination
    mean = [c / mean_norm for c in mean]
    dots = [s[i] * gm for i, gm in enumerate(matvec(g, mean))]  # <u_i, m>
    along = math.fsum(w[i] * dots[i] for i in range(n))
    tangent = [w[i] * s[i] - along * mean[i] for i in range(n)]
    r = norm(g, tangent) + eps
    scale = math.fsum(nv * wv for nv, wv in zip(norms, w))
    cos_r, sinc_r = math.cos(r), math.sin(r) / r
    return [(mean[i] * cos_r + tangent[i] * sinc_r) * scale for i in range(n)]


def _check(params: dict, model_params: list[dict]) -> str | None:
    weights = [p["weight"] for p in model_params if p["weight"] is not None]  # None: the base model
    if not weights:
        return "multislerp needs at least one model besides the base_model"
    if params["normalize_weights"] and sum(weights) == 0:
        return "multislerp with normalize_weights: true needs weights that do not sum to 0"
    return None


@merge_method(
    "multislerp",
    params=[
        Param("normalize_weights", kind=bool, default=True, doc="divide the weights by their sum"),
        Param("eps", default=1e-8, minimum=0, doc="stabilises divisions by norms"),
    ],
    model_params=[Param("weight", required=True, for_base=False, doc="barycentric weight of this model")],
    statistics=[gram_statistic("multislerp", lambda x: list(_vectors(x)), _coefficients, when=_several)],
    work_tensors=2,  # the output and its rounding; the rest works on small row blocks
    raw_inputs=True,
    check=_check,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(x: ChunkInputs) -> torch.Tensor:
    """Weighted spherical mean of the models' task vectors (or tensors), scaled by their mean norm."""
    if not _several(x):
        return x.others[0]
    coefficients = x.stats["multislerp"]

    def combine(xb: ChunkInputs) -> torch.Tensor:
        out = torch.zeros_like(xb.tensors[0])
        for c, v in zip(coefficients, _vectors(xb)):
            out += v * c
        if xb.base_index is not None:
            out += xb.base
        return out

    return blockwise(x, combine)
