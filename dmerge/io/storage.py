"""Where bytes live: local paths and any fsspec URL, read by byte range.

Local files use ``os.preadv`` straight into the destination buffer (no extra copy, the
GIL released). Everything else goes through fsspec's ``cat_file(path, start, end)``,
which s3fs and huggingface_hub's ``HfFileSystem`` implement as HTTP Range requests, so
a slice of a 10 GB shard costs only the bytes of the slice.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import re
from functools import lru_cache

import fsspec

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# "org/name" or "org/name@revision" as mergekit accepts for Hugging Face Hub repos.
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_url(location: str) -> bool:
    return bool(_URL.match(location))


def resolve_location(model: str, base_dir: str | None = None) -> str:
    """Turn a recipe's model reference into a folder location.

    Local paths (relative ones against ``base_dir``, the recipe's folder, when they
    exist there) stay local; ``scheme://`` URLs are used as they are; a Hub id
    ``org/name[@rev]`` that is not a local folder becomes ``hf://org/name[@rev]``.
    """
    if is_url(model):
        return model[len("file://"):] if model.startswith("file://") else model.rstrip("/")
    expanded = os.path.expanduser(model)
    candidates = [expanded]
    if base_dir and not os.path.isabs(expanded):
        candidates.insert(0, os.path.join(base_dir, expanded))
    for c in candidates:
        if os.path.isdir(c):
            return os.path.abspath(c)
    if _HF_REPO.match(model) and not model.startswith((".", "/")):
        return "hf://" + model
    return os.path.abspath(candidates[-1])


def join(location: str, name: str) -> str:
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def is_inside(folder: str, relative: str) -> bool:
    """True when ``relative`` names a file inside ``folder`` (no absolute path, no ``..``)."""
    if not relative or relative.startswith(("/", "\\")) or is_url(relative) or ":" in relative.split("/")[0]:
        return False
    norm = posixpath.normpath(relative.replace("\\", "/"))
    return not (norm == ".." or norm.startswith("../") or norm.startswith("/"))


@lru_cache(maxsize=64)
def _filesystem(protocol: str):
    return fsspec.filesystem(protocol)


def filesystem_for(location: str):
    """The fsspec filesystem for a URL, and the path it understands."""
    fs, path = fsspec.core.url_to_fs(location)
    return fs, path


def file_size(location: str) -> int:
    if not is_url(location):
        return os.stat(location).st_size
    fs, path = filesystem_for(location)
    return int(fs.size(path))


def exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = filesystem_for(location)
    return fs.exists(path)


def read_bytes(location: str) -> bytes:
    """Read a whole (small) file: config.json, an index, a tokenizer file."""
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = filesystem_for(location)
    return fs.cat_file(path)


def read_range_into(location: str, offset: int, out: memoryview) -> None:
    """Fill ``out`` with the bytes of ``location`` starting at ``offset``."""
    n = len(out)
    if n == 0:
        return
    if not is_url(location):
        fd = os.open(location, os.O_RDONLY)
        try:
            got = 0
            while got < n:
                r = os.preadv(fd, [out[got:]], offset + got)
                if r <= 0:
                    raise OSError(f"unexpected end of file reading {location} at {offset + got}")
                got += r
        finally:
            os.close(fd)
        return
    fs, path = filesystem_for(location)
    data = fs.cat_file(path, start=offset, end=offset + n)
    if len(data) != n:
        raise OSError(f"short read from {location}: wanted {n} bytes at {offset}, got {len(data)}")
    out[:] = data


def map_range(location: str, offset: int, length: int) -> tuple[mmap.mmap, int]:
    """Map ``length`` bytes of a local file at ``offset`` (copy-on-write, private).

    Returns the mapping and the position of ``offset`` inside it (mappings start on a
    page boundary). Reading through the mapping costs a page-table entry per page of
    the page cache instead of a copy into freshly zeroed memory: on the merge path that
    is the biggest saving after the arithmetic. Writes to the mapping stay private.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    fd = os.open(location, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, offset - start + length, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    finally:
        os.close(fd)
    return mapping, offset - start


def read_range(location: str, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    read_range_into(location, offset, memoryview(buf))
    return buf
