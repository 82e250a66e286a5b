"""Passthrough: copy one source tensor, optionally multiplied by ``scale``.

Used for frankenmerges (stacking layer ranges of several models). Without ``scale``
the engine copies the bytes without decoding them; with it, each element is
multiplied in the compute dtype and rounded once (dmerge/methods/_weighted.py; on the
CPU in the fused C kernel).
"""

from __future__ import annotations

from dmerge.lazy import torch
from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._weighted import weighted_sum


@merge_method(
    "passthrough",
    model_params=[Param("scale", default=None, doc="multiply the tensor by this factor")],
    copies_bytes=True,
    single_source=True,
    raw_inputs=True,
    work_tensors=0,  # scaled and rounded block by block: no chunk-sized temporary
)
def passthrough(x: ChunkInputs) -> torch.Tensor:
    """The single source tensor, times ``scale`` when given."""
    scale = x.model_params[0].get("scale")
    # x * 1.0 is x, bit for bit (a NaN stays a NaN): a dtype conversion takes the same path
    return weighted_sum(x, [1.0 if scale is None else scale], None)
