"""What RAM and RAM+ share: which models change which parameters.

A model *contributes* to a parameter where its task vector ``tau_i = x_i - base``
exceeds ``epsilon`` in magnitude. ``count`` is the number of contributors per element:
1 means the change is *unique* to one model, more than 1 that it is *shared*.
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs


def contributions(x: ChunkInputs, epsilon: float):
    """Task vectors with non-contributing elements zeroed, their masks, and the count."""
    base = x.base
    taus, masks = [], []
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for t in x.others:
        tau = t - base
        mask = tau.abs() > epsilon
        tau.masked_fill_(~mask, 0.0)
        count += mask
        taus.append(tau)
        masks.append(mask)
    return taus, masks, count
