"""What one task does: read parent rows by byte range, merge, write output bytes.

These functions run on Dask workers. Their arguments are small (a TensorPlan and a row
range); tensor data is read here from where the parents live and written here to its
planned offset, so it never passes through the scheduler or the client.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from dmerge import vocab
from dmerge.allocator import keep_freed_memory
from dmerge.errors import MergeExecutionError
from dmerge.io import storage
from dmerge.io.sinks import PartBuffer
from dmerge.io.spill import spill
from dmerge.io.zarr_store import ZarrEntry, read_zarr_rows
from dmerge.methods import ChunkInputs, get_method
from dmerge.methods.base import NONFINITE_OUTPUTS, context_of
from dmerge.numerics import BLOCK_ELEMENTS, count_nonfinite, round_to, torch_dtype, widen
from dmerge.worker_env import after_task

keep_freed_memory()  # workers import this module: tune their allocator once


def _inference(fn):
    """Run a task under ``torch.inference_mode``: no autograd bookkeeping (version
    counters, view tracking) on the many small operations of a task, about 8 % of a
    ties merge's time. Every task is wrapped, so tensors passed between tasks (the
    statistics' partials) are only ever touched in inference mode."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with torch.inference_mode():
                return fn(*args, **kwargs)
        finally:
            after_task()

    return run

ELEMENTWISE_BLOCK = BLOCK_ELEMENTS  # the cache-blocked elementwise path's flat blocks

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class ChunkJob:
    """Rows ``[row_start, row_stop)`` of one planned tensor, and where its output goes."""

    tensor: Any  # TensorPlan
    row_start: int
    row_stop: int
    sink: Any  # where the bytes go: a dmerge.io.sinks sink (local shard, upload part, zarr array)
    compute_dtype: str = "float64"
    device: str = "cpu"
    seed: int = 0
    allow_nan: bool = False
    # For a re-indexed vocabulary tensor: the part of its row map for these rows.
    row_map: Any = None


def compute_device(wanted: str) -> str:
    """The device a task computes on: ``cuda`` where this worker has a GPU, else the CPU
    (on a cluster some workers may have none; the bytes are the same either way)."""
    if wanted != "cpu" and not torch.cuda.is_available():
        return "cpu"
    return wanted


def read_rows(file: str, entry, row_start: int, row_stop: int, spill_mode: str | None = None
              ) -> tuple[torch.Tensor, int]:
    """Raw bytes of rows [row_start, row_stop) of a tensor (a uint8 tensor), and how many
    bytes were fetched from storage for them: one ranged read, or for a local file a
    private memory map of that range.

    ``spill_mode`` for a remote file read by a two-pass method (:mod:`dmerge.io.spill`):
    ``"keep"`` (a statistic pass: keep the bytes on local disk for the passes after it) or
    ``"take"`` (the write pass: use and drop them); bytes found there were not fetched."""
    if isinstance(entry, ZarrEntry):  # a parent stored as a zarr group: rows through zarr
        return read_zarr_rows(file, entry, row_start, row_stop)
    row_bytes = entry.row_bytes
    n = (row_stop - row_start) * row_bytes
    offset = entry.begin + row_start * row_bytes
    if n and not storage.is_url(file):
        mapping, at = storage.map_range(file, offset, n)
        return torch.frombuffer(mapping, dtype=torch.uint8, offset=at, count=n), n
    buf = torch.empty(n, dtype=torch.uint8)  # no zero-fill
    if not n:
        return buf, 0
    view = memoryview(buf.numpy())
    if spill_mode and spill.get_into(file, offset, view, take=spill_mode == "take"):
        return buf, 0
    storage.read_range_into(file, offset, view)
    if spill_mode == "keep":
        spill.put(file, offset, view)
    return buf, n


def _as_tensor(buf: torch.Tensor, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf.numel():
        return torch.empty(shape, dtype=torch_dtype(code))
    return buf.view(torch_dtype(code)).reshape(shape)


def _row_shape(tensor, rows: int) -> tuple[int, ...]:
    return (rows,) + tuple(tensor.shape[1:]) if tensor.shape else ()


def load_inputs(job: ChunkJob, pad_means: list | None = None, raw: bool = False,
                spill_mode: str | None = None) -> tuple[ChunkInputs, int]:
    """Read every parent's rows and widen them to the compute dtype (``raw``: keep their
    stored dtype and only name the compute dtype; the method converts per block).
    ``spill_mode``: see :func:`read_rows`.

    A re-indexed vocabulary tensor gathers its rows through the job's row map instead
    (``pad_means``: the padding rows' values, see :mod:`dmerge.vocab`).
    """
    tp = job.tensor
    dtype = COMPUTE_DTYPES[job.compute_dtype]
    shape = _row_shape(tp, job.row_stop - job.row_start)
    device = compute_device(job.device)
    tensors = []
    nread = 0
    if job.row_map is not None:
        rest = tuple(tp.shape[1:])
        if job.row_map.has_padding and pad_means is None and job.row_map.stop > job.row_map.n_tokens:
            pad_means = _whole_tensor_pad_means(job)
        tensors, nread = vocab.assemble(tp.sources, job.row_map, rest, dtype, device, pad_means)
    else:
        for src, (buf, n) in zip(tp.sources, _read_sources(tp.sources, job.row_start, job.row_stop, spill_mode)):
            nread += n
            t = _as_tensor(buf, src.entry.dtype, shape).to(device)
            tensors.append(t if raw else widen(t, dtype))
    inputs = ChunkInputs(
        tensor_name=tp.name,
        tensors=tensors,
        base_index=tp.base_index,
        params=tp.params,
        model_params=tp.model_params,
        full_shape=tp.shape,
        row_start=job.row_start,
        row_stop=job.row_stop,
        seed=job.seed,
        compute_dtype=dtype if raw else None,
        out_dtype=torch_dtype(tp.dtype),
    )
    return inputs, nread


_fetchers: ThreadPoolExecutor | None = None


def _read_sources(sources, row_start: int, row_stop: int, spill_mode: str | None) -> list:
    """:func:`read_rows` of every source; remote ones fetched at once (each ranged GET
    waits mostly on the store's latency), local ones mapped in turn."""
    global _fetchers
    remote = [i for i, s in enumerate(sources) if storage.is_url(s.file)]
    if len(remote) < 2:
        return [read_rows(s.file, s.entry, row_start, row_stop, spill_mode) for s in sources]
    if _fetchers is None:
        _fetchers = ThreadPoolExecutor(max_workers=storage.MAX_REQUESTS, thread_name_prefix="dmerge-fetch")
    futures = {i: _fetchers.submit(read_rows, sources[i].file, sources[i].entry, row_start, row_stop, spill_mode)
               for i in remote}
    return [futures[i].result() if i in futures else read_rows(s.file, s.entry, row_start, row_stop, spill_mode)
            for i, s in enumerate(sources)]


def _whole_tensor_pad_means(job: ChunkJob) -> list:
    rm = job.row_map
    if (rm.start, rm.stop) != (0, rm.rows):
        raise RuntimeError(f"{job.tensor.name}: padding means missing for a partial chunk")
    return vocab.pad_means_of(job.tensor.sources, rm, tuple(job.tensor.shape[1:]))


@dataclass(frozen=True)
class Reduction:
    """The result of a tensor-wide reduction (statistics, padding means) as tasks pass it
    on: its ``value``, and the parent bytes its passes read (reported once per tensor, by
    the write of its first chunk, so the run's total counts every byte fetched)."""

    value: Any
    bytes_read: int = 0


@_inference
def vocab_pad_partial(tensor, window) -> tuple[list, int]:
    """Per-source sums of one fixed block of a re-indexed vocabulary tensor's rows, and
    the bytes read for them."""
    return vocab.pad_partial(tensor.sources, window, tuple(tensor.shape[1:]))


@_inference
def vocab_pad_finalize(n_tokens: int, partials: list) -> Reduction:
    return Reduction(vocab.pad_finalize(n_tokens, [p for p, _ in partials]), sum(n for _, n in partials))


def _value(reduction: Reduction | None) -> Any:
    return None if reduction is None else reduction.value


def _statistic_partial(stat, inputs: ChunkInputs, prior: dict) -> Any:
    inputs.stats = dict(prior)
    return stat.chunk(inputs)


def _statistic_final(stat, partials: list, context: ChunkInputs, prior: dict) -> dict:
    """Earlier statistics plus this one, combined from its partials."""
    context.stats = dict(prior)
    out = dict(prior)
    out[stat.name] = stat.final(stat.combine_all(partials), context)
    return out


@_inference
def compute_statistic(job: ChunkJob, stat_index: int, prior: Reduction | None,
                      pad: Reduction | None = None) -> tuple[Any, int]:
    """Partial of statistic ``stat_index`` over one chunk (earlier statistics in ``prior``),
    and the parent bytes read for it: none where the statistic says this chunk's data is
    not needed (see :attr:`Statistic.reads`)."""
    method = get_method(job.tensor.method)
    stat = method.statistics[stat_index]
    earlier = _value(prior) or {}
    context = context_of(job.tensor, earlier, job.row_start, job.row_stop)
    if not stat.reads_data(context):
        return stat.chunk(context), 0
    # the passes after this one read the chunk again: keep remote bytes on local disk
    inputs, nread = load_inputs(job, _value(pad), raw=method.raw_inputs, spill_mode="keep")
    return _statistic_partial(stat, inputs, earlier), nread


def statistic_over_chunks(jobs: list[ChunkJob], stat_index: int, prior: Reduction | None,
                          pad: Reduction | None = None) -> Reduction:
    """One statistic of a tensor in one task: each chunk's partial in turn (reading only
    the chunks whose data it needs), then their reduction; the same value as a task per
    chunk and a reduction would give."""
    partials = [compute_statistic(job, stat_index, prior, pad) for job in jobs]
    return finalize_statistic(jobs[0].tensor, stat_index, prior, partials)


@_inference
def finalize_statistic(tensor, stat_index: int, prior: Reduction | None, partials: list) -> Reduction:
    """Combine the chunk partials of one statistic; returns all statistics so far."""
    stat = get_method(tensor.method).statistics[stat_index]
    earlier = _value(prior) or {}
    values = _statistic_final(stat, [p for p, _ in partials], context_of(tensor), earlier)
    return Reduction(values, (prior.bytes_read if prior else 0) + sum(n for _, n in partials))


@_inference
def merge_chunk(job: ChunkJob, stats: Reduction | None = None, pad: Reduction | None = None,
                report_reductions: bool = False) -> tuple[int, int, int]:
    """Merge one chunk and write it to its place. Returns (bytes read, bytes written,
    CRC-32 of the bytes written: the client's journal records it, and a resumed run
    compares it with what the shard holds); with ``report_reductions`` the bytes read
    also count those the tensor's statistics and padding means read.

    With ``stats`` None for a method that needs statistics, the chunk must be the whole
    tensor: the statistics are computed here from the same data (no second read).
    """
    extra = sum(r.bytes_read for r in (stats, pad) if r is not None) if report_reductions else 0
    nread, nwritten, checksum = _merge_chunk(job, _value(stats), _value(pad))
    return nread + extra, nwritten, checksum


@dataclass(frozen=True)
class PartJob:
    """One object-store upload part: bytes ``[start, stop)`` of a shard, uploaded as part
    ``number`` through ``sink`` (a :class:`dmerge.io.object_output.ObjectShard`);
    ``header`` holds the shard header's bytes when the part starts the shard."""

    sink: Any
    number: int
    start: int
    stop: int
    header: bytes | None = None


def upload_part(part: PartJob, members: list) -> tuple[int, int, int]:
    """Merge the write units of one part into memory and upload them as that part.

    ``members``: ``[job, stats, pad, report_reductions, computed]`` per write unit, in
    byte order (small tensors grouped, or one chunk of a big one); ``computed``: for a
    computed tensor (a MoE router), the computation's values for it, else None. Returns
    (bytes read, bytes uploaded, CRC-32 of the part)."""
    buffer = PartBuffer(part.start, part.stop)
    if part.header is not None:
        buffer.place(0, part.header)
    nread = 0
    for job, stats, pad, report, computed in members:
        job = dataclasses.replace(job, sink=buffer)
        if computed is not None:
            r, _, _ = write_computed(job, computed)
        else:
            r, _, _ = merge_chunk(job, stats, pad, report)
        nread += r
    payload = buffer.payload()
    checksum = zlib.crc32(payload)
    part.sink.upload(part.number, payload)
    return nread, len(payload), checksum


def _merge_pieces(job: ChunkJob) -> tuple[int, int, int]:
    """A chunk of a tensor assembled from pieces (see ``TensorPlan.pieces``): each piece's
    rows in the chunk are written as that piece's own chunk (copied, cast, scaled, ...),
    at the piece's place in the tensor; the CRC is taken over the chunk's bytes once written."""
    tp = job.tensor
    nread = nwritten = 0
    for out_row, piece in tp.pieces:
        a, b = max(job.row_start, out_row), min(job.row_stop, out_row + piece.rows)
        if a >= b:
            continue
        placed = dataclasses.replace(piece, shard=tp.shard, offset=tp.offset + out_row * tp.row_bytes)
        r, w, _ = _merge_chunk(dataclasses.replace(job, tensor=placed, row_start=a - out_row, row_stop=b - out_row),
                               None, None)
        nread += r
        nwritten += w
    return nread, nwritten, job.sink.checksum(tp, job.row_start, nwritten) if nwritten else zlib.crc32(b"")


def _merge_chunk(job: ChunkJob, stats: dict | None, pad_means: list | None) -> tuple[int, int, int]:
    tp = job.tensor
    if tp.pieces is not None:
        return _merge_pieces(job)
    if tp.copy_bytes and job.row_map is not None:
        rows, nread = vocab.gather_bytes(tp.sources, job.row_map, tp.row_bytes)
        data = memoryview(rows.reshape(-1).numpy()) if rows.numel() else memoryview(b"")
        return nread, *_write(job, data)
    if tp.copy_bytes:
        src = tp.sources[0]
        nbytes = (job.row_stop - job.row_start) * tp.row_bytes
        src_offset = src.entry.begin + job.row_start * src.entry.row_bytes
        if nbytes and not storage.is_url(src.file) and not isinstance(src.entry, ZarrEntry):
            checksum = job.sink.copy(tp, job.row_start, src.file, src_offset, nbytes)
            if checksum is not None:  # the bytes never passed through this process
                return nbytes, nbytes, checksum
        buf, nread = read_rows(src.file, src.entry, job.row_start, job.row_stop)
        return nread, *_write(job, memoryview(buf.numpy()))

    method = get_method(tp.method)
    blockwise = method.elementwise and not method.statistics
    # with statistics computed by earlier passes, they may have kept the remote bytes
    inputs, nread = load_inputs(job, pad_means, raw=method.raw_inputs or blockwise,
                                spill_mode="take" if stats is not None else None)
    if blockwise:
        merged = _merge_blockwise(inputs, method, torch_dtype(tp.dtype), COMPUTE_DTYPES[job.compute_dtype])
        return nread, *_finish(job, merged)
    needed = method.statistics_for(inputs) if method.statistics else []
    if stats is None and needed:
        # A one-chunk tensor: its statistics from the data already read, by the same
        # partial -> final steps the graph's statistic tasks take.
        if (job.row_start, job.row_stop) != (0, tp.rows):
            raise RuntimeError(f"{tp.name}: statistics missing for a partial chunk")
        stats = {}
        for _, stat in needed:
            partial = _statistic_partial(stat, inputs, stats)
            stats = _statistic_final(stat, [partial], context_of(tp), stats)
    inputs.stats = dict(stats or {})
    result = method.fn(inputs)
    # a fused kernel that wrote the rows counted their NaN/Inf already
    return nread, *_finish(job, round_to(result, torch_dtype(tp.dtype)), inputs.scratch.get(NONFINITE_OUTPUTS))


@_inference
def write_computed(job: ChunkJob, part: Reduction) -> tuple[int, int, int]:
    """Write rows of a computed tensor (no parent bytes: its values come from a
    computation of the plan, e.g. a MoE router from prompt hidden states). ``part`` holds
    the whole tensor's values and the parent bytes the computation read for it; they are
    rounded once to the output dtype, checked and written like a merged chunk's. Returns
    (bytes read, bytes written, CRC-32)."""
    tp = job.tensor
    values = torch.as_tensor(part.value)
    if tuple(values.shape) != tuple(tp.shape):
        raise MergeExecutionError(f"{tp.name}: computed values have shape {list(values.shape)}, "
                                  f"expected {list(tp.shape)}")
    rows = values[job.row_start:job.row_stop] if values.dim() else values
    written = _finish(job, round_to(rows.cpu(), torch_dtype(tp.dtype)))
    return (part.bytes_read if job.row_start == 0 else 0), *written


def _write(job: ChunkJob, data: memoryview) -> tuple[int, int]:
    """Hand the chunk's bytes to its sink; returns (bytes written, their CRC-32). The
    checksum is taken from the data in memory, before writing: no second pass over it."""
    checksum = zlib.crc32(data)
    job.sink.write(job.tensor, job.row_start, data)
    return len(data), checksum


def _merge_blockwise(inputs: ChunkInputs, method, out_dtype: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    """Run an elementwise method over flat blocks small enough to stay in cache.

    Each block is widened, merged and rounded before the next is touched, so the
    float64 temporaries never travel to main memory; the result is the same as one
    call on the whole chunk because every element is computed independently.
    """
    shape = inputs.tensors[0].shape
    flat = [t.reshape(-1) for t in inputs.tensors]
    n = flat[0].numel()
    out = torch.empty(n, dtype=out_dtype, device=flat[0].device)
    for a in range(0, n, ELEMENTWISE_BLOCK):
        b = min(n, a + ELEMENTWISE_BLOCK)
        block = dataclasses.replace(inputs, tensors=[widen(t[a:b], compute) for t in flat])
        out[a:b] = round_to(method.fn(block), out_dtype)
    return out.reshape(shape)


def _finish(job: ChunkJob, out: torch.Tensor, nonfinite: int | None = None) -> tuple[int, int]:
    """Check the rounded rows and write them to the job's sink; returns (bytes written,
    their CRC-32). ``nonfinite``: their NaN/Inf count where already known."""
    tp = job.tensor
    expected = _row_shape(tp, job.row_stop - job.row_start)
    if tuple(out.shape) != expected:
        raise MergeExecutionError(f"{tp.name}: {tp.method} returned shape {list(out.shape)}, expected {list(expected)}")
    out = out.contiguous().cpu()
    bad = 0 if job.allow_nan else (count_nonfinite(out) if nonfinite is None else nonfinite)
    if bad:
        raise MergeExecutionError(
            f"output tensor {tp.name} has {bad} NaN/Inf values (rows {job.row_start}-{job.row_stop}); "
            "use --allow-nan to write them anyway"
        )
    data = _bytes_of(out)
    expected_bytes = (job.row_stop - job.row_start) * tp.row_bytes
    if len(data) != expected_bytes:
        raise MergeExecutionError(f"{tp.name}: produced {len(data)} bytes, expected {expected_bytes}")
    return _write(job, data)


def _bytes_of(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


__all__ = ["ChunkJob", "PartJob", "Reduction", "merge_chunk", "upload_part", "write_computed", "compute_statistic",
           "finalize_statistic", "vocab_pad_partial",
           "vocab_pad_finalize", "context_of", "read_rows"]
