"""Model breadcrumbs: drop both the largest outliers and the small values of each task vector.

With n elements, ``n_top = int(gamma_i * n)`` and ``keep = int(density_i * n)``, the
magnitudes of tau_i = x_i - base ranked over the whole tensor, the kept elements are
the ``keep`` ones right below the ``n_top`` largest (fewer outliers are dropped when
``keep + n_top > n``, so that ``keep`` elements always survive). ``breadcrumbs`` merges
them by a weighted sum, ``breadcrumbs_ties`` with TIES sign consensus. Defaults: density
1 (no sparsification at all, gamma ignored, as mergekit), gamma 0.01, normalize false,
rescale false, lambda 1.

Davari & Belilovsky, "Model Breadcrumbs", https://arxiv.org/abs/2312.06795
"""

from dmerge.methods import Param
from dmerge.methods._gta import register_gta
from dmerge.methods._sparsify import MagnitudeOutliers

_REF = "https://arxiv.org/abs/2312.06795"
_GAMMA = (Param("gamma", default=0.01, minimum=0.0, maximum=1.0, for_base=False,
                doc="fraction of largest-magnitude elements dropped as outliers"),)

breadcrumbs = register_gta(
    "breadcrumbs",
    sparsifier=MagnitudeOutliers(),
    consensus=False,
    normalize=False,
    rescale=False,
    extra_model_params=_GAMMA,
    reference=_REF,
    doc="Drop the largest (outliers) and smallest task-vector magnitudes, weighted sum.",
)

breadcrumbs_ties = register_gta(
    "breadcrumbs_ties",
    sparsifier=MagnitudeOutliers(),
    consensus=True,
    normalize=False,
    rescale=False,
    extra_model_params=_GAMMA,
    reference=_REF,
    doc="Drop the largest (outliers) and smallest task-vector magnitudes, TIES sign consensus.",
)
