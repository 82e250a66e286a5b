"""Task arithmetic: add (or, with negative weights, subtract) task vectors to the base.

    tau_i = x_i - base
    out   = base + lambda * sum_i w_i tau_i [/ sum_i w_i if normalize]

A negative ``weight`` removes a capability ("forgetting via negation"). This is the
generalized task arithmetic of dmerge/methods/_gta.py without sparsification or sign
consensus; ``density``, ``rescale`` and ``int8_mask`` are accepted (as mergekit does)
and have no effect.
Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089
"""

from dmerge.methods._gta import register_gta

task_arithmetic = register_gta(
    "task_arithmetic",
    sparsifier=None,
    consensus=False,
    normalize=False,
    rescale=False,
    reference="https://arxiv.org/abs/2212.04089",
    doc="base + lambda * weighted sum of (model - base).",
)
