"""DELLA: drop task-vector elements at random, with keep probability rising with magnitude.

In each row (a vector is one row) the C magnitudes of tau_i = x_i - base get ascending
ranks r = 0 .. C-1 (ties by column) and keep probability

    p = density_i - epsilon_i + 2 * epsilon_i * r / (C - 1)      (p = density_i if C = 1)

drawn from keyed randomness; with ``rescale`` (default true) the kept elements are
scaled so the task vector keeps its l1 norm over the whole tensor. ``della`` merges with
TIES sign consensus (normalize default true), ``della_linear`` by a weighted sum
(normalize default false). Defaults: density 1, epsilon 0.15, lambda 1. As mergekit,
a recipe with 0 < density < 1 must have density - epsilon > 0 and density + epsilon < 1.

Deep et al., "DELLA-Merging", https://arxiv.org/abs/2406.11617
"""

from dmerge.methods import Param
from dmerge.methods._gta import register_gta
from dmerge.methods._sparsify import DellaMagprune

_REF = "https://arxiv.org/abs/2406.11617"
_EPSILON = (Param("epsilon", default=0.15, minimum=0.0, maximum=1.0, for_base=False,
                  doc="half-width of the keep-probability range around density"),)


def _check(params: dict, model_params: list[dict]) -> str | None:
    for mp in model_params:
        d, eps = mp.get("density"), mp.get("epsilon")
        if d is None or eps is None or not 0 < d < 1:
            continue
        if d + eps >= 1 or d - eps <= 0:
            return f"della needs density - epsilon > 0 and density + epsilon < 1, got density {d:g}, epsilon {eps:g}"
    return None


della = register_gta(
    "della",
    sparsifier=DellaMagprune(),
    consensus=True,
    normalize=True,
    rescale=True,
    extra_model_params=_EPSILON,
    check=_check,
    reference=_REF,
    doc="Magnitude-ranked random drop (MagPrune), rescale, TIES sign consensus.",
)

della_linear = register_gta(
    "della_linear",
    sparsifier=DellaMagprune(),
    consensus=False,
    normalize=False,
    rescale=True,
    extra_model_params=_EPSILON,
    check=_check,
    reference=_REF,
    doc="Magnitude-ranked random drop (MagPrune), rescale, weighted sum.",
)
