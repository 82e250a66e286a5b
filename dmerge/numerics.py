"""Numerics shared by all methods: the compute dtype and correctly rounded output.

Parents are widened exactly to the compute dtype (float64 by default: bf16/fp16/fp32
values are exact there, and a weighted sum of a few of them has error far below an
output ulp). The result is rounded *once* to the output dtype.

PyTorch converts float64 to bf16/fp16 through float32, which rounds twice: when the
float32 value lands exactly on a bf16 midpoint the tie is broken by the float32
rounding rather than the true value (about 1 element in 10^5). :func:`round_to`
detects those ties and nudges the float32 value towards the true side first, so every
element is the float64 value rounded to nearest-even.
"""

from __future__ import annotations

import torch

from dmerge.io.safetensors_format import DTYPES

# Output dtype -> number of float32 mantissa bits dropped when narrowing to it.
_DROPPED_BITS = {torch.bfloat16: 16, torch.float16: 13}


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``x`` (float64 or float32) to ``dtype`` with a single round-to-nearest-even."""
    if x.dtype == dtype:
        return x
    if x.dtype != torch.float64 or dtype not in _DROPPED_BITS:
        return x.to(dtype)
    f32 = x.to(torch.float32, memory_format=torch.contiguous_format)
    dropped = _DROPPED_BITS[dtype]
    bits = f32.view(torch.int32)
    low = bits & ((1 << dropped) - 1)
    tie = low == (1 << (dropped - 1))
    if bool(tie.any()):
        # Ties are rare (about 1 in 2^16 elements): fix just those, in place.
        where = tie.reshape(-1).nonzero().squeeze(1)
        flat = bits.reshape(-1)
        true = x.reshape(-1)[where].abs()
        back = f32.reshape(-1)[where].to(torch.float64).abs()
        # true value beyond the midpoint: round away from zero; short of it: towards
        flat[where] += (true > back).to(torch.int32) - (true < back).to(torch.int32)
        f32 = flat.view(torch.float32).reshape(f32.shape)
    return f32.to(dtype)


def torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code]
