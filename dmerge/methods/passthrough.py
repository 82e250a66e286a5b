"""Passthrough: copy one source tensor, optionally multiplied by ``scale``.

Used for frankenmerges (stacking layer ranges of several models). Without ``scale``
the engine copies the bytes without decoding them.
"""

from __future__ import annotations

from dmerge.lazy import torch

from dmerge.methods import ChunkInputs, Param, merge_method


@merge_method(
    "passthrough",
    model_params=[Param("scale", default=None, doc="multiply the tensor by this factor")],
    copies_bytes=True,
    single_source=True,
    work_tensors=1,
)
def passthrough(x: ChunkInputs) -> torch.Tensor:
    """The single source tensor, times ``scale`` when given."""
    scale = x.model_params[0].get("scale")
    t = x.tensors[0]
    return t if scale is None else t * scale
