"""TIES-merging: trim, elect sign, disjoint merge.

    tau_i = x_i - base, trimmed to its k_i = max(1, int(density_i * n)) largest
            magnitudes over the whole tensor (n elements)
    d_i   = w_i * tau_i
    out   = base + lambda * sum_i agree_i d_i / sum_i agree_i w_i

where ``agree_i`` says d_i has the sign of sum_j d_j (zero has no sign). Defaults:
density 1 (no trimming), normalize true, rescale false, lambda 1. The k-th largest
magnitude is found by radix select (two histogram statistics), never by sorting;
elements tied with it are kept lowest flat index first, so exactly k_i survive.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708
"""

from dmerge.methods._gta import register_gta
from dmerge.methods._sparsify import MagnitudeTopK

ties = register_gta(
    "ties",
    sparsifier=MagnitudeTopK(),
    consensus=True,
    normalize=True,
    rescale=False,
    reference="https://arxiv.org/abs/2306.01708",
    doc="Trim each task vector to its largest magnitudes, elect a sign per element, average the agreeing ones.",
)
