"""Where a task's output bytes land: the sink interface.

A merge task produces the bytes of rows ``[row_start, row_stop)`` of one planned tensor.
It hands them to the sink its job names; nothing else in a task knows where bytes go.
Sinks are small picklable descriptions (a path, an upload id), sent with the tasks:

* :class:`LocalShard`: a preallocated shard file on a local or shared filesystem,
  written with ``pwrite`` at the rows' planned offset (and, for a byte copy between
  local files, with ``copy_file_range`` inside the kernel).
* :class:`PartBuffer`: one part of an object-store multipart upload, assembled in the
  task's memory from the write units it groups, then uploaded whole
  (:mod:`dmerge.io.object_output`).
* :class:`dmerge.io.zarr_store.ZarrArraySink`: one tensor's zarr array; a task's rows
  are whole zarr shards of it (``--output-format zarr``).

Writing is idempotent everywhere: a retried task writes the same bytes to the same place.
The client-side half (``prepare``, ``commit``, ``abort``) belongs to the output classes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from dmerge.io.output import checksum_range, copy_range, write_range


def rows_offset(tensor, row_start: int) -> int:
    """Byte offset in its shard of row ``row_start`` of a planned tensor."""
    return tensor.offset + row_start * tensor.row_bytes


@dataclass(frozen=True)
class LocalShard:
    """A preallocated ``.partial`` shard file, written by position."""

    path: str

    def write(self, tensor, row_start: int, data: memoryview) -> None:
        write_range(self.path, rows_offset(tensor, row_start), data)

    def copy(self, tensor, row_start: int, src: str, src_offset: int, nbytes: int) -> int | None:
        """Copy ``nbytes`` of the local file ``src`` into place without passing them
        through this process; returns their CRC-32 as written, or None where the
        kernel cannot (the caller then reads and writes)."""
        if not copy_range(src, src_offset, self.path, rows_offset(tensor, row_start), nbytes):
            return None
        # checksummed where they landed (the page cache, just written): the journal
        # holds what the shard holds
        return self.checksum(tensor, row_start, nbytes)

    def checksum(self, tensor, row_start: int, nbytes: int) -> int:
        """CRC-32 of ``nbytes`` written from row ``row_start`` of ``tensor`` (read back)."""
        return checksum_range(self.path, rows_offset(tensor, row_start), nbytes)


@dataclass
class PartBuffer:
    """The bytes ``[start, stop)`` of a shard, gathered in memory for one upload.

    A write covering the whole part keeps the caller's buffer (no copy: a big tensor's
    chunk is its own part); several writes fill a bytearray."""

    start: int
    stop: int
    _whole: memoryview | None = field(default=None, repr=False)
    _buffer: bytearray | None = field(default=None, repr=False)
    filled: int = 0

    def write(self, tensor, row_start: int, data: memoryview) -> None:
        self.place(rows_offset(tensor, row_start), data)

    def place(self, offset: int, data) -> None:
        """Put ``data`` (bytes of the shard at ``offset``) into the part."""
        n = len(data)
        if offset < self.start or offset + n > self.stop:
            raise ValueError(f"bytes [{offset}, {offset + n}) fall outside the part [{self.start}, {self.stop})")
        if n == self.stop - self.start:
            self._whole = memoryview(data).cast("B")
        else:
            if self._buffer is None:
                self._buffer = bytearray(self.stop - self.start)
            self._buffer[offset - self.start:offset - self.start + n] = data
        self.filled += n

    def copy(self, tensor, row_start: int, src: str, src_offset: int, nbytes: int) -> int | None:
        return None

    def checksum(self, tensor, row_start: int, nbytes: int) -> int:
        """CRC-32 of ``nbytes`` written from row ``row_start`` of ``tensor``."""
        offset = rows_offset(tensor, row_start) - self.start
        if self._whole is not None:
            return zlib.crc32(self._whole[offset:offset + nbytes])
        return zlib.crc32(memoryview(self._buffer)[offset:offset + nbytes])

    def payload(self) -> memoryview:
        """The part's bytes, once every byte of it was written."""
        if self.filled != self.stop - self.start:
            raise RuntimeError(f"part [{self.start}, {self.stop}) got {self.filled} bytes")
        if self._whole is not None:
            return self._whole
        return memoryview(self._buffer if self._buffer is not None else b"")


__all__ = ["LocalShard", "PartBuffer", "rows_offset"]
