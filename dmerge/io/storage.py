"""Where bytes live: local paths and any fsspec URL, read by byte range.

Local files use ``os.preadv`` straight into the destination buffer (no extra copy, the
GIL released). Everything else goes through fsspec's ``cat_file(path, start, end)``,
which s3fs and huggingface_hub's ``HfFileSystem`` implement as HTTP Range requests, so
a slice of a 10 GB shard costs only the bytes of the slice.

Remote reads are made robust here, once, for every backend:

* **retries**: a transient failure (5xx, throttling, a timeout, a connection reset in
  the middle of a body, a body shorter than asked for) is retried with exponential
  backoff and jitter, ``DMERGE_READ_RETRIES`` times (default 6, about 30 s in all); a
  short body is never passed on. A permanent one (404, 403, a bad bucket name) fails at
  once with one line naming the object.
* **bounded concurrency**: at most ``DMERGE_MAX_REQUESTS`` (default 16) remote requests
  at once per process, whatever the number of task threads, so a worker never opens
  hundreds of connections to one endpoint.
* **storage options** (credentials, endpoints) reach every process through fsspec's own
  configuration (:func:`configure`): ``fsspec.filesystem("s3")`` then picks them up, in
  dmerge and in every other fsspec user in the process.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import random
import re
import threading
import time

import fsspec

from dmerge.errors import DMergeError


class StorageError(DMergeError, OSError):
    """A remote object could not be read or written (after retries where that could help)."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object (or its bucket or repository) does not exist: a :class:`StorageError`
    that callers asking "is it there?" catch as ``FileNotFoundError``, as for local files."""


READ_RETRIES = int(os.environ.get("DMERGE_READ_RETRIES", "6"))
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 8.0
MAX_REQUESTS = int(os.environ.get("DMERGE_MAX_REQUESTS", "16"))
_requests = threading.BoundedSemaphore(max(1, MAX_REQUESTS))

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
        from dmerge.io.hub import resolve_hub_model

        return resolve_hub_model(model)  # a complete cached snapshot, else hf://
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


# Errors no retry can fix: the object or bucket is not there, or we may not read it.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def is_permanent(error: BaseException) -> bool:
    """Whether a storage error is worth retrying (False) or final (True)."""
    if isinstance(error, _PERMANENT):
        return True
    status = _http_status(error)
    return status is not None and 400 <= status < 500 and status not in (408, 409, 425, 429)


def _http_status(error: BaseException) -> int | None:
    """The HTTP status inside a botocore/aiohttp/requests error, where there is one."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    for attr in ("status", "status_code"):
        value = getattr(error, attr, None) if response is None else getattr(response, attr, None)
        if isinstance(value, int):
            return value
    return None


def describe_error(location: str, error: BaseException) -> str:
    """One line naming the object and what went wrong with it."""
    if isinstance(error, FileNotFoundError):
        return f"{location}: not found (404: no such object, or the bucket/repository does not exist)"
    if isinstance(error, PermissionError) or _http_status(error) in (401, 403):
        return (f"{location}: access denied (403: check the credentials, e.g. --storage-options or "
                "AWS_*/HF_TOKEN in the environment, and that they may read this object)")
    text = str(error).strip().splitlines()
    return f"{location}: {type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def with_retries(location: str, attempt, what: str = "read"):
    """Call ``attempt()`` until it succeeds, retrying transient errors with exponential
    backoff and jitter; a permanent error, or the last transient one, becomes a
    :class:`StorageError` naming ``location``."""
    for n in range(READ_RETRIES + 1):
        try:
            with _requests:
                return attempt()
        except Exception as e:  # noqa: BLE001 - classified below
            if isinstance(e, StorageError):
                raise
            if is_permanent(e):
                error = StorageNotFound if isinstance(e, FileNotFoundError) else StorageError
                raise error(f"cannot {what} {describe_error(location, e)}") from e
            if n == READ_RETRIES:
                raise StorageError(f"cannot {what} {describe_error(location, e)} "
                                   f"(gave up after {READ_RETRIES + 1} tries)") from e
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** n)
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


class ShortRead(OSError):
    """A body shorter than the range asked for (a connection cut mid-body): retried."""


# -- storage options ---------------------------------------------------------------------

def storage_options_for(options: dict | None, locations: list[str]) -> dict[str, dict]:
    """Per-protocol fsspec options from ``--storage-options``.

    Either keyed by protocol (``{"s3": {...}, "hf": {...}}``) or flat (``{"endpoint_url":
    ...}``), which then applies to every protocol among ``locations``. Credentials never
    belong in a recipe: they come from here or from the usual environment.
    """
    if not options:
        return {}
    if not isinstance(options, dict):
        raise DMergeError("--storage-options must be a JSON object")
    known = set(fsspec.available_protocols())
    if all(k in known and isinstance(v, dict) for k, v in options.items()):
        return {k: dict(v) for k, v in options.items()}
    protocols = sorted({protocol_of(loc) for loc in locations if is_url(loc)})
    if not protocols:
        raise DMergeError("--storage-options given, but neither the output nor any model is a URL; "
                          "key the options by protocol, e.g. {\"s3\": {...}}")
    return {p: dict(options) for p in protocols}


def configure(options: dict[str, dict]) -> None:
    """Make ``options`` (protocol -> fsspec keyword arguments) the defaults of this
    process's filesystems. Run in the client and, by the worker plugin, on every worker."""
    if not options:
        return
    for protocol, kwargs in options.items():
        try:
            impl = fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:  # not installed, or no such protocol
            raise DMergeError(f"--storage-options for {protocol}://: {str(e).strip().splitlines()[0]}") from None
        for name in impl.protocol if isinstance(impl.protocol, (tuple, list)) else (impl.protocol,):
            fsspec.config.conf.setdefault(name, {}).update(kwargs)
        impl.clear_instance_cache()


def protocol_of(location: str) -> str:
    return location.split("://", 1)[0] if is_url(location) else "file"


def filesystem_for(location: str):
    """The fsspec filesystem for a URL, and the path it understands."""
    fs, path = fsspec.core.url_to_fs(location)
    return fs, path


def file_size(location: str) -> int:
    if not is_url(location):
        return os.stat(location).st_size
    fs, path = filesystem_for(location)
    return int(with_retries(location, lambda: fs.size(path), "find the size of"))


def exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = filesystem_for(location)
    return bool(with_retries(location, lambda: fs.exists(path), "look for"))


def read_bytes(location: str) -> bytes:
    """Read a whole (small) file: config.json, an index, a tokenizer file."""
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = filesystem_for(location)
    return with_retries(location, lambda: fs.cat_file(path))


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
    if location.startswith("hf://"):
        from dmerge.io.hub import redirects

        def fetch(start, stop):  # the cached redirect target, not a resolve per range
            return redirects.read(location, start, stop)
    else:
        fs, path = filesystem_for(location)

        def fetch(start, stop):
            return fs.cat_file(path, start=start, end=stop)

    def attempt():
        data = fetch(offset, offset + n)
        if len(data) != n:  # a body cut short: never merged, asked for again
            raise ShortRead(f"short read: wanted {n} bytes at {offset}, got {len(data)}")
        out[:] = data

    with_retries(location, attempt)


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
