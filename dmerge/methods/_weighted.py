"""A weighted sum of the sources, rounded once: linear's arithmetic and passthrough's ``scale``.

    acc = x_0 * w_0
    acc = acc + x_i * w_i        for i = 1, 2, ... in source order
    acc = acc / divisor          (when given)

in the compute dtype, each product and each sum rounded on its own (never a fused
multiply-add: ``torch.add(..., alpha=w)`` fuses on its vectorized path and not on its
scalar tail, so its bits would depend on where a block ends). The fused CPU kernel
(:func:`dmerge.native.weighted_sum`) does the same operations in the same order, so
both give the same bytes; it runs for float64 compute on the CPU, this module's torch
code everywhere else (a GPU, float32 compute, no C compiler, ``DMERGE_NATIVE=0``).

Inputs come as stored (``raw_inputs``) and are widened block by block; each block is
rounded to the output dtype as soon as it is done, so no chunk-sized compute-dtype
tensor exists.
"""

from __future__ import annotations

from dmerge import native
from dmerge.lazy import torch
from dmerge.methods.base import NONFINITE_OUTPUTS, ChunkInputs
from dmerge.methods._reduce import compute_dtype
from dmerge.numerics import BLOCK_ELEMENTS, GPU_BLOCK_ELEMENTS, round_to, widen


def weighted_sum(x: ChunkInputs, weights: list[float], divisor: float | None,
                 tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]`` [``/ divisor``] (default tensors: all of
    ``x.tensors``, in order), rounded to ``x.out_dtype``."""
    tensors = list(x.tensors) if tensors is None else tensors
    dtype = compute_dtype(x)
    out_dtype = x.out_dtype or dtype
    ref = tensors[0]
    out = torch.empty(ref.shape, dtype=out_dtype, device=ref.device)
    if dtype == torch.float64 and len(tensors) <= native.MAX_MODELS and native.usable(out, *tensors):
        x.scratch[NONFINITE_OUTPUTS] = native.weighted_sum(tensors, weights, divisor, out)
        return out
    flat = [t.reshape(-1) for t in tensors]
    flat_out = out.view(-1)
    n = flat_out.numel()
    step = BLOCK_ELEMENTS if ref.device.type == "cpu" else GPU_BLOCK_ELEMENTS
    for a in range(0, n, step):
        b = min(n, a + step)
        # torch.mul, not mul_: an input already in the compute dtype is not copied by widen
        acc = torch.mul(widen(flat[0][a:b], dtype), weights[0])
        for t, w in zip(flat[1:], weights[1:]):
            acc.add_(torch.mul(widen(t[a:b], dtype), w))
        if divisor is not None:
            acc.div_(divisor)
        flat_out[a:b] = round_to(acc, out_dtype)
    return out


__all__ = ["weighted_sum"]
