"""DARE: drop and rescale task vectors at random.

    keep_i ~ Bernoulli(density_i), elementwise, from keyed randomness
    tau_i  = keep_i * (x_i - base) * l1(x_i - base) / l1(kept)   (rescale: true)

``dare_ties`` then merges with TIES sign consensus, ``dare_linear`` by a plain weighted
sum (see dmerge/methods/_gta.py). Defaults: density 1, rescale true, normalize false,
lambda 1. As in mergekit, the rescale keeps each task vector's l1 norm over the whole
tensor (a tensor-wide statistic) rather than dividing by ``density`` as in the paper;
both have expectation 1.

Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099
"""

from dmerge.methods._gta import register_gta
from dmerge.methods._sparsify import RandomDrop

_REF = "https://arxiv.org/abs/2311.03099"

dare_ties = register_gta(
    "dare_ties",
    sparsifier=RandomDrop(),
    consensus=True,
    normalize=False,
    rescale=True,
    reference=_REF,
    doc="Randomly drop task-vector elements (keep probability density), rescale, TIES sign consensus.",
)

dare_linear = register_gta(
    "dare_linear",
    sparsifier=RandomDrop(),
    consensus=False,
    normalize=False,
    rescale=True,
    reference=_REF,
    doc="Randomly drop task-vector elements (keep probability density), rescale, weighted sum.",
)
