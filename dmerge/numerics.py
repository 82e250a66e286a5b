"""Numerics shared by all methods: the compute dtype and correctly rounded output.

Parents are widened exactly to the compute dtype (float64 by default: bf16/fp16/fp32
values are exact there, and a weighted sum of a few of them has error far below an
output ulp). The result is rounded *once* to the output dtype.

PyTorch converts float64 to bf16/fp16 through float32, which rounds twice: when the
float32 value lands exactly on a bf16 midpoint the tie is broken by the float32
rounding rather than the true value (about 1 element in 10^5). :func:`round_to`
detects those ties and nudges the float32 value towards the true side first, so every
element is the float64 value rounded to nearest-even.

Work on a chunk goes in blocks of :data:`BLOCK_ELEMENTS` elements (of whole rows,
``dmerge.methods._reduce.row_blocks``; flat, for the engine's elementwise path and
:func:`count_nonfinite`), so that its temporaries stay small.
"""

from __future__ import annotations

import functools

from dmerge.lazy import torch


# Block sizes, in elements. No result depends on them: blocked work is elementwise,
# row-local or an integer count, and tensor-wide sums go through the split-independent
# row tree of dmerge.methods._reduce (tests run with tiny blocks to check that).
BLOCK_ELEMENTS = 1 << 17
"""On a CPU. A float64 temporary of this many elements is 1 MiB: the few that a step
holds stay in a core's L2 cache, and two threads' working sets fit the L3 (the
sparsifiers were slower at 2^18; Gram sums and slerp take the same time at 2^19)."""
GPU_BLOCK_ELEMENTS = 1 << 24
"""On a GPU, where kernel launches, not caches, are the cost: few, large blocks."""


@functools.cache
def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``)."""
    from dmerge.io.safetensors_format import TORCH_DTYPE_NAMES

    return getattr(torch, TORCH_DTYPE_NAMES[code])


@functools.cache
def _dropped_bits() -> dict:
    """Output dtype -> number of float32 mantissa bits dropped when narrowing to it
    (built on first use: importing this module does not import torch)."""
    return {torch.bfloat16: 16, torch.float16: 13}


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``x`` (float64 or float32) to ``dtype`` with a single round-to-nearest-even."""
    if x.dtype == dtype:
        return x
    dropped_bits = _dropped_bits()
    if x.dtype != torch.float64 or dtype not in dropped_bits:
        return x.to(dtype)
    f32 = x.to(torch.float32).contiguous()
    dropped = dropped_bits[dtype]
    bits = f32.view(-1).view(torch.int32)
    at_midpoint = (bits & ((1 << dropped) - 1)) == (1 << (dropped - 1))
    ties = at_midpoint.nonzero().squeeze(1) if bool(at_midpoint.any()) else None  # any() is cheap, nonzero is not
    if ties is not None:
        # Only a few elements in 10^5 land on a midpoint: fix those by index.
        true = x.reshape(-1)[ties].abs()
        rounded = f32.view(-1)[ties].double().abs()
        step = (true > rounded).to(torch.int32) - (true < rounded).to(torch.int32)
        bits[ties] += step  # one float32 ulp towards the true value (sign-magnitude)
    return f32.to(dtype)



@functools.cache
def _exponent_bits() -> dict:
    """dtype -> (integer dtype of the same width, mask of its exponent bits)."""
    return {
        torch.bfloat16: (torch.int16, 0x7F80),
        torch.float16: (torch.int16, 0x7C00),
        torch.float32: (torch.int32, 0x7F800000),
        torch.float64: (torch.int64, 0x7FF0000000000000),
    }


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of a floating tensor (0 for other dtypes).

    An IEEE value is NaN or Inf exactly when its exponent bits are all ones; testing the
    bit pattern as an integer is about 3x faster than ``torch.isfinite`` on bf16 here.
    """
    if not t.is_floating_point():
        return 0
    spec = _exponent_bits().get(t.dtype)
    if spec is None or not t.is_contiguous():
        return int((~torch.isfinite(t)).sum())
    int_dtype, mask = spec
    bits = t.reshape(-1).view(int_dtype)
    bad = 0
    for a in range(0, bits.numel(), BLOCK_ELEMENTS):  # blocks: temporaries stay in cache
        special = (bits[a: a + BLOCK_ELEMENTS] & mask) == mask
        if bool(special.any()):
            bad += int(special.sum())
    return bad


def widen(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact conversion of a parent tensor to the compute dtype.

    fp16 goes to float64 through float32 (also exact): with torch 2.13 on this project's
    CPUs that is faster on cache-sized blocks than the direct cast (0.20 vs 0.28 ns per
    element), while for bf16 the direct cast is the faster one (0.11 vs 0.23 ns).
    """
    if t.dtype == torch.float16 and dtype == torch.float64:
        return t.to(torch.float32).to(torch.float64)
    return t.to(dtype)
