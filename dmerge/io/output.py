"""The output folder: preallocated shards written by position, finished atomically.

Every shard's header is known from the plan, so each shard is created up front at its
final size (``<name>.partial``, header written, data blocks reserved) and every
chunk task writes its bytes with ``pwrite`` at a fixed offset: no task waits for
another, and writing the same chunk twice (a retried task) writes the same bytes to the
same place. Only when every chunk is done are the shards renamed to their final names
and ``model.safetensors.index.json`` written, last: a folder with an index is complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib

from dmerge.errors import DMergeError
from dmerge.io import storage
from dmerge.io.journal import is_unfinished
from dmerge.io.model_source import TOKENIZER_FILES
from dmerge.units import format_bytes

PARTIAL_SUFFIX = ".partial"


def write_range(path: str, offset: int, data: memoryview) -> None:
    """Write ``data`` at ``offset`` of an existing local file (idempotent)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    finally:
        os.close(fd)


def copy_range(src: str, src_offset: int, path: str, offset: int, length: int) -> bool:
    """Copy ``length`` bytes of the local file ``src`` into ``path`` at ``offset``, inside
    the kernel (``copy_file_range``: no trip through user memory, no page faults).

    Returns False, having written nothing, where the kernel cannot do it (no syscall,
    another filesystem on an old kernel, a special file); the caller then reads and
    writes. Idempotent like :func:`write_range`.
    """
    if not hasattr(os, "copy_file_range"):
        return False
    src_fd = os.open(src, os.O_RDONLY)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            done = 0
            while done < length:
                try:
                    n = os.copy_file_range(src_fd, fd, length - done, src_offset + done, offset + done)
                except OSError as e:
                    if done == 0 and e.errno in _NO_KERNEL_COPY:
                        return False
                    raise
                if n == 0:  # source shorter than its header says
                    raise OSError(errno.EIO, f"{src}: unexpected end of file at byte {src_offset + done}")
                done += n
            return True
        finally:
            os.close(fd)
    finally:
        os.close(src_fd)


def checksum_range(path: str, offset: int, length: int) -> int:
    """CRC-32 of ``length`` bytes of a local file at ``offset`` (read in 16 MiB blocks)."""
    checksum = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < length:
            block = os.pread(fd, min(16 << 20, length - done), offset + done)
            if not block:
                raise OSError(errno.EIO, f"{path}: unexpected end of file at byte {offset + done}")
            checksum = zlib.crc32(block, checksum)
            done += len(block)
    finally:
        os.close(fd)
    return checksum


# copy_file_range errors that mean "not here", not "failed".
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


def _reserve(fd: int, size: int) -> None:
    """Allocate the shard's blocks up front.

    Filling a sparse hole makes the filesystem allocate blocks page by page as data
    arrives; reserving them in one call makes the later positional writes 2-3x faster on
    ext4/xfs and turns a full disk into an error before any merging. Filesystems without
    fallocate (some network mounts) keep the sparse file.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the space checked up front was taken meanwhile
            raise DMergeError(f"the disk filled up while reserving the output ({format_bytes(size)} for one shard)") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


# Files a merge writes besides its shards: with --overwrite, those an earlier merge left
# and this one does not write again are removed before the index marks the folder whole,
# so the folder never mixes two merges (e.g. an old tokenizer.model beside a new
# tokenizer.json).
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MERGE_FILES = ("config.json", "mergekit_config.yml", "README.md") + TOKENIZER_FILES


def is_weight_file(name: str) -> bool:
    """Model weights a loader would pick up: safetensors shards, PyTorch bins, their indexes."""
    return (name.endswith(".safetensors") or name in INDEX_NAMES
            or (name.startswith("pytorch_model") and name.endswith(".bin")))


def disk_free(folder: str) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``folder``."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


class LocalOutput:
    """A local (or shared-filesystem) output folder.

    ``overwrite``: the folder may already hold a model; its weights are replaced only at
    :meth:`commit_shards`, once every new shard is complete, so a failed merge leaves the
    earlier model as it was. Without it, a folder holding weights is refused.
    """

    def __init__(self, folder: str, overwrite: bool = False):
        if storage.is_url(folder):
            raise DMergeError("output to object storage is not supported yet; use a local or shared path")
        self.folder = os.path.abspath(folder)
        self.overwrite = overwrite
        self._created_folder = False
        self._files: list[str] = []
        self._earlier: list[str] = []  # files of an earlier merge, replaced at commit

    def shard_path(self, name: str) -> str:
        return os.path.join(self.folder, name + PARTIAL_SUFFIX)

    def prepare(self, shards, resume: bool = False) -> set[str]:
        """Check the folder and the free space, then create every shard at full size with
        its header in place (as ``<name>.partial``). Returns the names of the shards
        created afresh.

        A folder holding an interrupted run (see :mod:`dmerge.io.journal`) is refused
        unless ``overwrite`` (start again) or ``resume``. With ``resume`` the shards
        already there are kept where they have the planned size and header (a shard
        already renamed to its final name, the run having been stopped while finishing,
        is taken back as ``.partial``); the others are created afresh, so every unit the
        journal places in them is written again.
        """
        if not resume and is_unfinished(self.folder) and not self.overwrite:
            raise DMergeError(f"an unfinished merge is in {self.folder}; pass --resume to continue it "
                              "or --overwrite to start again")
        existing = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        weights = [n for n in existing if is_weight_file(n)]
        # With resume, weights beside the partials are those an --overwrite run replaces
        # at its commit (a run could not have started there otherwise).
        if weights and not self.overwrite and not resume:
            shown = ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
            raise DMergeError(
                f"{self.folder} already holds model weights ({shown}); pass --overwrite to replace them "
                "(mergekit overwrites an output folder silently; dmerge keeps the earlier model until the "
                "new merge is complete)"
            )
        kept: set[str] = set()
        if resume:
            for shard in shards:
                final = os.path.join(self.folder, shard.name)
                if not os.path.exists(self.shard_path(shard.name)) and _has_layout(final, shard):
                    os.replace(final, self.shard_path(shard.name))
                if _has_layout(self.shard_path(shard.name), shard):
                    kept.add(shard.name)
            existing = sorted(os.listdir(self.folder))
        self._earlier = [n for n in existing if is_weight_file(n) or n in MERGE_FILES]
        total = sum(shard.size for shard in shards)
        free = disk_free(self.folder)
        leftovers = sum(os.path.getsize(self.shard_path(s.name)) for s in shards
                        if os.path.isfile(self.shard_path(s.name)))  # an interrupted run's, replaced or kept
        if total > free + leftovers:
            raise DMergeError(
                f"not enough disk space for the output in {self.folder}: it needs {format_bytes(total)} "
                f"({total} B), {format_bytes(free + leftovers)} are free"
            )
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder)
            self._created_folder = True
        fresh = set()
        for shard in shards:
            path = self.shard_path(shard.name)
            self._files.append(path)
            if shard.name in kept:
                continue
            with open(path, "wb") as f:
                f.write(shard.header)
                f.truncate(shard.size)
                _reserve(f.fileno(), shard.size)
            fresh.add(shard.name)
        return fresh

    def commit_shards(self, shards) -> None:
        """Give the finished shards their names. An earlier merge's index goes first (the
        folder no longer looks complete), then its weights."""
        names = {shard.name for shard in shards}
        for name in sorted(self._earlier, key=lambda n: n not in INDEX_NAMES):
            if is_weight_file(name) and name not in names:
                _remove(os.path.join(self.folder, name))
        for shard in shards:
            os.replace(self.shard_path(shard.name), os.path.join(self.folder, shard.name))
            self._files.remove(self.shard_path(shard.name))
            self._files.append(os.path.join(self.folder, shard.name))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, doc: dict) -> None:
        self.write_text(name, json.dumps(doc, indent=2, sort_keys=False) + "\n")

    def write_bytes(self, name: str, data: bytes) -> None:
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        self._files.append(path)

    def write_index(self, doc: dict, name: str = "model.safetensors.index.json") -> None:
        """Write the index, last: it marks the folder complete. Files of an earlier merge
        that this one did not write again are removed first."""
        written = {os.path.basename(p) for p in self._files}
        for old in self._earlier:
            if old not in written and old != name:
                _remove(os.path.join(self.folder, old))
        self.write_json(name, doc)

    def abort(self) -> None:
        """Remove everything this run wrote (and the folder, if this run created it)."""
        for path in self._files:
            _remove(path)
        self._files.clear()
        if self._created_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _has_layout(path: str, shard) -> bool:
    """Whether ``path`` is a file of the shard's planned size that starts with its header."""
    try:
        if os.path.getsize(path) != shard.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(shard.header)) == shard.header
    except (FileNotFoundError, NotADirectoryError):
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
