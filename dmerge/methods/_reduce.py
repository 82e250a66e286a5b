"""Sums over a whole tensor that do not depend on how it was split into chunks.

A floating-point sum depends on the order of its additions. To make a tensor-wide sum
(a norm, a dot product) bit-identical however the rows were chunked, which worker ran
which chunk and which CPU it ran on, every addition here happens in one fixed order,
defined by the tensor's shape alone:

* **within a row**: a pairwise tree over the row's elements (element ``i`` is added to
  element ``i + n/2``, and so on), done with elementwise tensor additions only.
  ``torch.sum`` is not used: its order is up to the kernel (SIMD width, and threads
  when a single long row is reduced).
* **across rows**: a dyadic tree over the *global* row index. Row pairs (2m, 2m+1) are
  added, then pairs of those, and so on. A chunk adds the complete subtrees that lie
  inside its rows and hands the others (at most two per level) to the reduction, which
  finishes the same tree. The value of every tree node is therefore the same wherever
  it was computed.

Elementwise IEEE additions are exactly reproducible, so the totals are too. They are
pairwise float64 sums: relative error about ``log2(n) * 2**-53`` of the sum of
magnitudes, far below anything a bf16/fp16/fp32 output can show.

Work inside a chunk goes by **row blocks** (:func:`row_blocks`, :func:`blockwise`; sizes in
:mod:`dmerge.numerics`): temporaries stay small and cache-resident, and are reused by
the allocator instead of being page-faulted in for every chunk (several times faster
than whole-chunk temporaries). Splitting rows never changes a result, since rows are
independent until the tree above combines them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

from dmerge.lazy import torch

from dmerge.methods.base import ChunkInputs, Statistic
from dmerge.numerics import BLOCK_ELEMENTS, GPU_BLOCK_ELEMENTS, widen

# ------------------------------------------------------------------- within a chunk


def lastdim_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed pairwise order; shape ``x.shape[:-1]``."""
    n = x.shape[-1]
    if n == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    while n > 1:
        h = n // 2
        y = x[..., :h] + x[..., h : 2 * h]
        if n % 2:
            y[..., :1] += x[..., 2 * h :]
        x, n = y, h
    return x[..., 0]


def compute_dtype(x: ChunkInputs) -> torch.dtype:
    """The dtype a method computes in: ``x.compute_dtype`` for inputs given as stored
    (``raw_inputs``), else the dtype the engine already converted them to."""
    return x.compute_dtype or x.tensors[0].dtype


def row_blocks(x: ChunkInputs, dtype: torch.dtype | None = None) -> Iterator[ChunkInputs]:
    """The chunk as consecutive blocks of whole rows, about ``BLOCK_ELEMENTS`` elements
    each (``GPU_BLOCK_ELEMENTS`` on a GPU), its tensors converted to ``dtype`` (default:
    the compute dtype) block by block: inputs given as stored (``raw_inputs``) are
    never converted whole. Parameters and statistics are the chunk's.

    Rows stay whole, so per-row work (row sums, DELLA's ranks) and keyed randomness
    (``element_offset``) see the same thing in any block. Only tensors of two or more
    dimensions are split: a vector (or scalar) is one block. A block's tensors may be
    views of the chunk's: treat them as read-only.
    """
    dtype = dtype or compute_dtype(x)
    ref = x.tensors[0]
    if ref.dim() < 2:
        yield dataclasses.replace(x, tensors=[widen(t, dtype) for t in x.tensors], compute_dtype=None)
        return
    block = BLOCK_ELEMENTS if ref.device.type == "cpu" else GPU_BLOCK_ELEMENTS
    step = max(1, block // max(1, ref[0].numel()))
    for r0 in range(0, ref.shape[0], step):
        r1 = min(ref.shape[0], r0 + step)
        yield dataclasses.replace(x, tensors=[widen(t[r0:r1], dtype) for t in x.tensors],
                                  row_start=x.row_start + r0, row_stop=x.row_start + r1, compute_dtype=None)


def blockwise(x: ChunkInputs, fn: Callable[[ChunkInputs], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied to every row block, assembled into one output (for row-local math)."""
    out = None
    for xb in row_blocks(x):
        y = fn(xb)
        if xb.row_start == x.row_start and xb.row_stop == x.row_stop:
            return y
        if out is None:
            out = torch.empty(x.tensors[0].shape, dtype=y.dtype, device=y.device)
        out[xb.row_start - x.row_start : xb.row_stop - x.row_start] = y
    return out


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View a chunk as ``[rows, elements per row]`` (a 1-D tensor's rows are its elements)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums ``[rows]`` of a chunk, over all its non-leading dimensions."""
    return lastdim_sum(as_rows(x))


def rows_of(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) else 1


def as_float64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.to(torch.float64)


# ------------------------------------------------------------------- across chunks
# A partial is (n_rows, [(level, index, value), ...]): tree nodes not yet combined.
# Node (level, m) covers global rows [m * 2**level, (m + 1) * 2**level) of n_rows.

TreePartial = "tuple[int, list[tuple[int, int, torch.Tensor]]]"


def _count(n_rows: int, level: int) -> int:
    return -(-n_rows // (1 << level))


def tree_partial(values: torch.Tensor, row_start: int, n_rows: int) -> TreePartial:
    """Reduce per-row values ``[rows, ...]`` of global rows ``[row_start, row_start + rows)``.

    Returns the nodes of the canonical row tree that this chunk can complete, but whose
    parents need rows outside it.
    """
    nodes: list[tuple[int, int, torch.Tensor]] = []
    level, lo, x = 0, row_start, values
    while x.shape[0]:
        count = _count(n_rows, level)
        if count == 1:  # the root
            nodes.append((level, 0, x[0].clone()))
            break
        if lo % 2:  # a right child whose left sibling is in an earlier chunk
            nodes.append((level, lo, x[0].clone()))
            x, lo = x[1:], lo + 1
            if not x.shape[0]:
                break
        hi = lo + x.shape[0]
        tail = None
        if hi % 2:  # the last node is a left child
            if hi < count:  # its sibling is in a later chunk
                nodes.append((level, hi - 1, x[-1].clone()))
            else:  # it has no sibling: it is its own parent
                tail = x[-1:]
            x = x[:-1]
        x = x[0::2] + x[1::2]
        if tail is not None:
            x = torch.cat([x, tail])
        lo //= 2
        level += 1
    return n_rows, nodes


def tree_combine(partials: list[TreePartial]) -> TreePartial:
    """Merge partials, completing every tree node whose children are all present."""
    n_rows = partials[0][0]
    levels: dict[int, dict[int, torch.Tensor]] = {}
    for n, nodes in partials:
        if n != n_rows:
            raise ValueError("partials of different tensors")
        for level, index, value in nodes:
            levels.setdefault(level, {})[index] = value
    root_level = max(0, (n_rows - 1).bit_length())
    kept: list[tuple[int, int, torch.Tensor]] = []
    for level in range(root_level + 1):
        here = levels.pop(level, {})
        if level == root_level:
            kept.extend((level, i, v) for i, v in here.items())
            break
        count = _count(n_rows, level)
        up = levels.setdefault(level + 1, {})
        for i in sorted(here):
            v = here[i]
            if i % 2 == 0 and i + 1 >= count:  # no sibling: its own parent
                up[i // 2] = v
            elif i % 2 == 0 and i + 1 in here:
                up[i // 2] = v + here[i + 1]
            elif i % 2 == 0 or i - 1 not in here:  # sibling still missing
                kept.append((level, i, v))
    return n_rows, kept


def chunk_partial(x: ChunkInputs, blocks: Iterable[tuple[ChunkInputs, torch.Tensor]]) -> TreePartial:
    """The row-tree partial of chunk ``x`` from the per-row values ``[rows, ...]`` of each
    of its row blocks ``(block, values)``."""
    n_rows = rows_of(x.full_shape)
    parts = [tree_partial(values.cpu(), xb.row_start, n_rows) for xb, values in blocks]
    return parts[0] if len(parts) == 1 else tree_combine(parts)


def tree_total(partial: TreePartial) -> torch.Tensor:
    """The root of a fully combined tree: the sum over all rows."""
    n_rows, nodes = tree_combine([partial])
    roots = [v for level, i, v in nodes if _count(n_rows, level) == 1 and i == 0]
    if len(nodes) != 1 or len(roots) != 1:
        raise RuntimeError(f"row tree incomplete: {[(lv, i) for lv, i, _ in nodes]} of {n_rows} rows")
    return roots[0]


def row_total_statistic(
    name: str,
    per_row: Callable[[ChunkInputs], torch.Tensor],
    finalize: Callable[[torch.Tensor, ChunkInputs], object] | None = None,
    when: Callable[[ChunkInputs], bool] | None = None,
) -> Statistic:
    """A statistic summing ``per_row(x)`` (float64 ``[rows, ...]``) over all rows of a tensor.

    ``per_row`` is called on row blocks of each chunk. The finalized value is the total
    (``[...]`` float64) or ``finalize(total, context)``.
    """

    def chunk(x: ChunkInputs) -> TreePartial:
        return chunk_partial(x, ((xb, per_row(xb)) for xb in row_blocks(x)))

    def final(partial: TreePartial, context: ChunkInputs):
        total = tree_total(partial)
        return total if finalize is None else finalize(total, context)

    return Statistic(name=name, chunk=chunk, combine=tree_combine, finalize=final, when=when)


# ------------------------------------------------------------------- Gram matrices


def dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner products ``[rows]``: :func:`row_sums` of ``a * b``, with the first
    level of the pairwise tree fused into the products (same result, half the memory)."""
    a, b = as_rows(a), as_rows(b)
    n = a.shape[1]
    if n < 2:
        return row_sums(a * b)
    h = n // 2
    y = a[:, :h] * b[:, :h]
    y += a[:, h : 2 * h] * b[:, h : 2 * h]
    if n % 2:
        y[:, :1] += a[:, 2 * h :] * b[:, 2 * h :]
    return lastdim_sum(y)


def gram_rows(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Per-row inner products of every pair of vectors: ``[rows, m(m+1)/2]`` (upper triangle)."""
    cols = []
    for i, a in enumerate(vectors):
        for b in vectors[i:]:
            cols.append(dot_rows(a, b))
    return torch.stack(cols, dim=1)


def gram_from_triangle(values: list[float]) -> list[list[float]]:
    """The symmetric m x m matrix from its upper triangle, row-major."""
    m = int(round(((8 * len(values) + 1) ** 0.5 - 1) / 2))
    g = [[0.0] * m for _ in range(m)]
    k = 0
    for i in range(m):
        for j in range(i, m):
            g[i][j] = g[j][i] = float(values[k])
            k += 1
    return g


def gram_statistic(
    name: str,
    vectors: Callable[[ChunkInputs], list[torch.Tensor]],
    finalize: Callable[[list[list[float]], ChunkInputs], object] | None = None,
    when: Callable[[ChunkInputs], bool] | None = None,
    sources: bool = False,
) -> Statistic:
    """Tensor-wide Gram matrix ``G[i][j] = <v_i, v_j>`` of the vectors ``vectors(x)``
    (each a whole tensor flattened), as float64 Python floats; then ``finalize``.
    ``vectors`` is called on row blocks.

    ``sources``: the vectors are some of the chunk's source tensors themselves (no
    arithmetic on them), so the fused kernel (:func:`dmerge.native.gram_rows`) can take
    them as stored and compute the same row sums in the same order."""

    def per_row(x: ChunkInputs) -> torch.Tensor:
        return gram_rows([as_float64(v) for v in vectors(x)])

    def final(total: torch.Tensor, context: ChunkInputs):
        g = gram_from_triangle(total.tolist())
        return g if finalize is None else finalize(g, context)

    stat = row_total_statistic(name, per_row, final, when)
    if not sources:
        return stat

    def chunk(x: ChunkInputs) -> TreePartial:
        values = _gram_rows_native(x, vectors(x))
        return stat.chunk(x) if values is None else chunk_partial(x, [(x, values)])

    return dataclasses.replace(stat, chunk=chunk)


def _gram_rows_native(x: ChunkInputs, vectors: list[torch.Tensor]) -> torch.Tensor | None:
    """:func:`gram_rows` of a whole chunk by the fused kernel; None where it does not
    apply (kernels unavailable, not float64 compute, an empty chunk)."""
    from dmerge import native

    ref = x.tensors[0]
    rows = ref.shape[0] if ref.dim() else 1
    if (compute_dtype(x) != torch.float64 or not rows or not ref.numel() or len(vectors) > native.MAX_MODELS
            or not native.usable(*vectors)):
        return None
    return native.gram_rows(list(vectors), rows, ref.numel() // rows)
