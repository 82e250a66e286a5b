"""Merged models as zarr v3 groups: written by the workers, read as parents, exported.

Layout of a group written by ``dmerge run --output-format zarr`` (see docs/storage.md):

* one array per output tensor, named as the tensor, with the tensor's shape; chunked
  along rows with the sharding codec: the outer shard is the plan's row chunk (so each
  merge task writes whole zarr shards and no two tasks touch one object), the inner
  chunks about :data:`INNER_CHUNK_BYTES` of whole rows (what a ranged read fetches);
  bytes codec little-endian, no compression (weights barely compress, and raw chunks
  keep reads and writes at storage speed); the array attribute ``safetensors_dtype``
  holds the safetensors dtype code. bf16 and float8 use the data types of
  :mod:`dmerge.io.zarr_dtypes`.
* beside the arrays, the plain files of an HF folder as ``dmerge run`` writes them
  (``config.json``, ``mergekit_config.yml``, ``README.md``, tokenizer files);
* the group's ``zarr.json``, written last, with the attribute ``dmerge`` (config,
  recipe, every tensor's name, dtype and shape in order, the safetensors shard layout
  and index, ``"complete": true``). Until it exists the folder is no zarr group at all,
  so a failed or killed merge leaves nothing that opens as one. No consolidated
  metadata: zarr-python 3.1 parses every array's metadata in it on opening the group,
  so one bf16 array would make the group unreadable to a zarr without dmerge's data
  types; the tensor table in the attributes serves dmerge's own reads (one request).

Writes and reads go through zarr-python's stores: a local folder (``LocalStore``) or any
fsspec URL zarr can write to (``FsspecStore``; the options of ``--storage-options``
reach it through fsspec's configuration).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np

from dmerge.errors import DMergeError, InputModelError
from dmerge.io import storage
from dmerge.io.safetensors_format import TensorEntry, build_header

FORMAT = "dmerge-zarr/1"
GROUP_ATTRIBUTE = "dmerge"
DTYPE_ATTRIBUTE = "safetensors_dtype"
# Target bytes of an inner chunk (whole rows): the unit a partial read fetches. 4 MiB
# keeps the shard index small and a ranged read of a few rows cheap.
INNER_CHUNK_BYTES = 4 << 20

# safetensors dtype code -> numpy dtype of an element in memory (bit patterns for the
# formats numpy lacks)
NATIVE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "bool", "F8_E4M3": "u1", "F8_E5M2": "u1"}


def _zarr():
    """zarr, with dmerge's data types registered."""
    import zarr

    from dmerge.io import zarr_dtypes

    zarr_dtypes.register()
    return zarr


def zarr_dtype(code: str):
    """The zarr v3 data type a safetensors dtype is stored as."""
    from dmerge.io.zarr_dtypes import BFloat16, Float8E4M3FN, Float8E5M2

    special = {"BF16": BFloat16(), "F8_E4M3": Float8E4M3FN(), "F8_E5M2": Float8E5M2()}
    if code in special:
        return special[code]
    return {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
            "I8": "int8", "U8": "uint8", "BOOL": "bool"}[code]


def open_store(location: str, read_only: bool):
    """A zarr store over a local folder or an fsspec URL."""
    zarr = _zarr()
    if storage.is_url(location):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(location, read_only=read_only)
    return zarr.storage.LocalStore(location, read_only=read_only)


def is_zarr_group(location: str) -> bool:
    """Whether ``location`` holds a zarr v3 node (its ``zarr.json``)."""
    try:
        return storage.exists(storage.join(location, "zarr.json"))
    except Exception:  # noqa: BLE001 - unreachable: the safetensors path reports it
        return False


# -- array layout -----------------------------------------------------------------------

@dataclass(frozen=True)
class ArrayLayout:
    """Rows per zarr shard (the plan's chunk) and per inner chunk."""

    shard_rows: int
    inner_rows: int


def _inner_rows(row_bytes: int, target: int) -> int:
    return max(1, target // max(1, row_bytes))


def _split(rows_per_chunk: int, row_bytes: int, target: int) -> tuple[int, int]:
    """(rows per chunk, rows per inner chunk): the chunk cut into the fewest inner chunks
    of at most ``target`` bytes (one row at least), and rounded down to a whole number of
    them, which loses fewer rows than inner chunks."""
    pieces = math.ceil(rows_per_chunk / _inner_rows(row_bytes, target))
    inner = rows_per_chunk // pieces
    return inner * pieces, inner


def align_plan(plan, target: int = INNER_CHUNK_BYTES):
    """The plan with every split tensor's rows per chunk a multiple of its inner chunk
    rows (rounded down a little: tasks only get smaller), so that every chunk is whole
    zarr shards of whole inner chunks. The merged values do not depend on chunking."""
    tensors = []
    for tp in plan.tensors:
        if len(tp.shape) >= 1 and tp.n_chunks > 1:
            rows, _ = _split(tp.rows_per_chunk, tp.row_bytes, target)
            if rows != tp.rows_per_chunk:
                tp = dataclasses.replace(tp, rows_per_chunk=rows,
                                         task_bytes=math.ceil(tp.task_bytes * rows / tp.rows_per_chunk))
        tensors.append(tp)
    return dataclasses.replace(plan, tensors=tensors)


def layout_of(tp, target: int = INNER_CHUNK_BYTES) -> ArrayLayout | None:
    """The zarr chunking of a planned tensor (None for a 0-d tensor: one plain chunk)."""
    if not tp.shape:
        return None
    if tp.n_chunks == 1:
        # one task writes the whole tensor: one shard, rounded up to whole inner chunks
        inner = max(1, min(_inner_rows(tp.row_bytes, target), tp.rows))
        return ArrayLayout(max(1, math.ceil(tp.rows / inner)) * inner, inner)
    _, inner = _split(tp.rows_per_chunk, tp.row_bytes, target)
    while tp.rows_per_chunk % inner:  # only for plans not aligned by align_plan
        inner -= 1
    return ArrayLayout(tp.rows_per_chunk, inner)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("__") or name in (".", "..", "zarr.json"):
        raise DMergeError(f"tensor {name!r} cannot be a zarr array name; write this merge as safetensors")


# -- arrays as the workers see them -------------------------------------------------------

def _options_key(location: str) -> str | None:
    """This process's fsspec options for the location's protocol, as a cache key."""
    if not storage.is_url(location):
        return None
    import json

    import fsspec

    return json.dumps(fsspec.config.conf.get(storage.protocol_of(location)), sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _store(location: str, read_only: bool, options: str | None):
    """One store per place, mode and storage options in a process (an fsspec store
    holds a connection pool)."""
    return open_store(location, read_only)


def _array(location: str, name: str, token, writable: bool):
    """An opened array, kept per process (``token`` ties it to one run, or one set of
    parent metadata, so a cached array never outlives what it describes)."""
    return _opened_array(location, name, token, writable, _options_key(location))


@functools.lru_cache(maxsize=512)
def _opened_array(location: str, name: str, token, writable: bool, options: str | None):
    zarr = _zarr()
    return zarr.open_array(_store(location, not writable, options), path=name, mode="r+" if writable else "r",
                           zarr_format=3)


@dataclass(frozen=True)
class ZarrArraySink:
    """One output tensor's zarr array: a task writes its rows as whole shards."""

    location: str  # the group (local folder or URL)
    name: str  # the array
    token: str  # the run id

    def write(self, tensor, row_start: int, data: memoryview) -> None:
        if not len(data):
            return
        array = _array(self.location, self.name, self.token, True)
        values = np.frombuffer(data, dtype=NATIVE[tensor.dtype])
        if not tensor.shape:
            array[()] = values.reshape(())
            return
        rows = len(data) // tensor.row_bytes
        array[row_start:row_start + rows] = values.reshape((rows,) + tuple(tensor.shape[1:]))

    def copy(self, tensor, row_start: int, src: str, src_offset: int, nbytes: int) -> int | None:
        return None  # no kernel copy into a zarr shard: read and write


# -- reading a dmerge group as a parent -------------------------------------------------

@dataclass(frozen=True)
class ZarrEntry(TensorEntry):
    """A tensor stored as a zarr array (``name``) of a group: its rows are read through
    zarr, never by byte offset. ``begin``/``end`` span its bytes as if contiguous, so
    sizes and row counts work as for a safetensors entry."""


def read_zarr_rows(location: str, entry: ZarrEntry, row_start: int, row_stop: int):
    """Raw bytes of rows ``[row_start, row_stop)`` of a zarr-stored tensor (a uint8
    tensor) and their count: zarr fetches only the inner chunks covering the rows."""
    import torch

    n = (row_stop - row_start) * entry.row_bytes
    if not n:
        return torch.empty(0, dtype=torch.uint8), 0
    array = _array(location, entry.name, (entry.dtype, entry.shape), False)
    values = array[()] if not entry.shape else array[row_start:row_stop]
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if flat.nbytes != n:
        raise InputModelError(f"{location}: array {entry.name} gave {flat.nbytes} bytes for rows "
                              f"{row_start}-{row_stop}, expected {n}")
    return torch.from_numpy(flat), n


def read_group_attributes(location: str, what: str) -> tuple[object, dict]:
    """Open a complete dmerge zarr group: (the zarr group, its ``dmerge`` attribute)."""
    zarr = _zarr()
    try:
        group = zarr.open_group(open_store(location, read_only=True), mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - one line naming the place
        raise InputModelError(f"{what}: {location} is not a readable zarr group ({e})") from None
    attrs = group.attrs.asdict().get(GROUP_ATTRIBUTE)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise InputModelError(f"{what}: the zarr group at {location} was not written by dmerge "
                              f"(no {GROUP_ATTRIBUTE!r} attribute of format {FORMAT})")
    if attrs.get("complete") is not True:
        raise InputModelError(f"{what}: the zarr group at {location} is not complete")
    return group, attrs


def tensor_table(attrs: dict, where: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor of a dmerge group, in order."""
    table = []
    for t in attrs.get("tensors", []):
        try:
            name, code, shape = t["name"], t["dtype"], tuple(int(s) for s in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise InputModelError(f"{where}: malformed tensor entry {t!r} in the group's attributes") from None
        if code not in NATIVE:
            raise InputModelError(f"{where}: tensor {name!r} has unsupported dtype {code!r}")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("__") or name in (".", ".."):
            raise InputModelError(f"{where}: {name!r} is not an array name of this group")
        table.append((name, code, shape))
    return table


def open_zarr_model(reference: str, location: str):
    """A parent model stored as a dmerge zarr group (metadata only: the group's
    ``zarr.json``, whose attributes list every tensor; each array's own metadata is
    read by the first task that reads it)."""
    from dmerge.io.model_source import ModelSource, TensorLocation
    from dmerge.io.safetensors_format import itemsize

    where = f"model {reference}"
    _, attrs = read_group_attributes(location, where)
    config = attrs.get("config")
    if not isinstance(config, dict):
        raise InputModelError(f"{where}: the zarr group at {location} has no config")
    tensors = {}
    for name, code, shape in tensor_table(attrs, where):
        tensors[name] = TensorLocation(location, ZarrEntry(name, code, shape, 0, math.prod(shape) * itemsize(code)))
    return ModelSource(reference=reference, location=location, config=config, tensors=tensors)


# -- the output group, as the client sees it ----------------------------------------------

def _sync(coroutine):
    from zarr.core.sync import sync

    return sync(coroutine)


async def _store_all(store, items: dict, concurrency: int = 32) -> None:
    """Write ``key -> Buffer`` items, ``concurrency`` at a time."""
    import asyncio

    gate = asyncio.Semaphore(concurrency)

    async def put(key, value):
        async with gate:
            await store.set(key, value)

    await asyncio.gather(*(put(k, v) for k, v in items.items()))


def _buffer(data: bytes):
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


class ZarrOutput:
    """A zarr group being written: arrays created up front (their metadata only), the
    rows written by the workers through :class:`ZarrArraySink`, the HF files beside,
    and the group's ``zarr.json`` last (:meth:`write_index`)."""

    def __init__(self, location: str, overwrite: bool = False):
        self.location = location if storage.is_url(location) else os.path.abspath(location)
        self.folder = self.location  # as the other outputs name it in messages
        self.overwrite = overwrite
        self.store = open_store(self.location, read_only=False)
        self._created_folder = False
        self._written: list[str] = []  # keys and array names this run wrote
        self._files: dict[str, bytes] = {}
        self._plan = None

    def _listing(self) -> list[str]:
        async def names():
            return [n async for n in self.store.list_dir("")]

        try:
            return sorted(_sync(names()))
        except FileNotFoundError:
            return []

    def prepare(self, plan, token: str) -> None:
        """Check the place, then create every array (metadata, no data)."""
        zarr = _zarr()
        existing = [] if (not storage.is_url(self.location) and not os.path.isdir(self.location)) else self._listing()
        if existing:
            if not self.overwrite:
                what = "a zarr group" if "zarr.json" in existing else "files"
                raise DMergeError(f"{self.location} already holds {what} ({', '.join(existing[:3])}"
                                  f"{' ...' if len(existing) > 3 else ''}); pass --overwrite to replace it")
            # the group marker first: from here the place no longer looks complete
            _sync(self.store.delete("zarr.json"))
            _sync(self.store.delete_dir(""))
        if not storage.is_url(self.location) and not os.path.isdir(self.location):
            os.makedirs(self.location)
            self._created_folder = True
        names = set()
        for tp in plan.tensors:
            _check_name(tp.name)
            names.add(tp.name)
        self._plan = plan
        self.token = token
        # The arrays' metadata is made in memory by zarr, then stored with one concurrent
        # write per array: on an object store, creating arrays one by one through zarr
        # costs several requests each (existence checks, parents) in sequence.
        made_keys: dict = {}
        made = zarr.storage.MemoryStore(made_keys)
        for tp in plan.tensors:
            layout = layout_of(tp)
            shape = tuple(tp.shape)
            if layout is None:
                kwargs = {"chunks": ()}
            else:
                rest = tuple(tp.shape[1:])
                kwargs = {"shards": (layout.shard_rows,) + rest, "chunks": (layout.inner_rows,) + rest}
                if 0 in rest:
                    kwargs = {"chunks": (max(1, layout.shard_rows),) + tuple(max(1, d) for d in rest)}
            zarr.create_array(made, name=tp.name, shape=shape, dtype=zarr_dtype(tp.dtype), compressors=None,
                              filters=None, fill_value=0, attributes={DTYPE_ATTRIBUTE: tp.dtype},
                              config={"write_empty_chunks": True}, **kwargs)
        self._written += [tp.name for tp in plan.tensors]
        # (zarr also made an implicit root group there: not copied, the group's
        # zarr.json is this output's completion marker, written last)
        _sync(_store_all(self.store, {f"{tp.name}/zarr.json": made_keys[f"{tp.name}/zarr.json"]
                                      for tp in plan.tensors}))

    def sink_for(self, tensor_index: int, tp) -> ZarrArraySink:
        return ZarrArraySink(self.location, tp.name, self.token)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self._plan is not None and name in {t.name for t in self._plan.tensors}:
            raise DMergeError(f"the file {name} and a tensor of that name would collide in the zarr group")
        _sync(self.store.set(name, _buffer(bytes(data))))
        self._written.append(name)
        self._files[name] = bytes(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, doc: dict) -> None:
        import json

        self.write_text(name, json.dumps(doc, indent=2, sort_keys=False) + "\n")

    def write_index(self, doc: dict, name: str = "model.safetensors.index.json") -> None:
        """Write the group's ``zarr.json`` (attributes and consolidated metadata), last:
        it marks the group complete. ``doc`` is the safetensors index the same merge
        would have written; it is kept in the attributes for the export."""
        import json

        from dmerge import __version__

        zarr = _zarr()
        plan = self._plan
        first_header = plan.shards[0].header
        metadata = json.loads(first_header[8:].decode("utf-8")).get("__metadata__", {})
        attributes = {GROUP_ATTRIBUTE: {
            "format": FORMAT,
            "complete": True,
            "dmerge_version": __version__,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in plan.tensors],
            "config": json.loads(self._files["config.json"]) if "config.json" in self._files else plan.out_config,
            "recipe": self._files.get("mergekit_config.yml", b"").decode("utf-8"),
            "files": sorted(self._files),
            "safetensors": {
                "shards": [{"name": s.name, "tensors": [plan.tensors[i].name for i in s.tensors]}
                           for s in plan.shards],
                "metadata": metadata,
                "index_name": name,
                "index": doc,
            },
        }}
        self._written.append("zarr.json")
        zarr.create_group(self.store, attributes=attributes)

    def abort(self) -> None:
        """Remove what this run wrote (the group's marker first), and the folder if this
        run created it."""
        written = (["zarr.json"] if "zarr.json" in self._written else []) + \
            [n for n in reversed(self._written) if n != "zarr.json"]
        for name in written:
            try:
                _sync(self.store.delete(name))
                _sync(self.store.delete_dir(name))
            except FileNotFoundError:
                pass
        self._written.clear()
        if self._created_folder:
            shutil.rmtree(self.location, ignore_errors=True)


# -- zarr group -> safetensors folder ---------------------------------------------------------

# Bytes read from an array at a time by the export (whole zarr shards, at least one),
# and arrays exported at once.
EXPORT_BLOCK_BYTES = 32 << 20
EXPORT_THREADS = 8


def export_safetensors(location: str, out_dir: str, *, overwrite: bool = False, progress=None) -> dict:
    """Write the dmerge zarr group at ``location`` as an HF folder ``out_dir``: the
    safetensors shards and index the merge would have written, byte for byte, and the
    files kept beside the group. Streams :data:`EXPORT_THREADS` arrays at a time, each a
    block of whole zarr shards at a time (memory stays about ``EXPORT_THREADS *
    EXPORT_BLOCK_BYTES``), each block written at its place in its shard. Returns counts."""
    from concurrent.futures import ThreadPoolExecutor

    from dmerge.io.output import LocalOutput, write_range
    from dmerge.plan import ShardPlan

    zarr = _zarr()
    group, attrs = read_group_attributes(location, "export-safetensors")
    layout = attrs["safetensors"]
    # names from the group become file names in out_dir: plain names only
    for name in [s["name"] for s in layout["shards"]] + list(attrs.get("files", [])) + [layout.get("index_name", "")]:
        if name and (not isinstance(name, str) or os.path.basename(name) != name or name in (".", "..")):
            raise DMergeError(f"export-safetensors: the zarr group at {location} names a file {name!r} outside "
                              "the folder")
    table = {name: (name, code, shape) for name, code, shape in tensor_table(attrs, "export-safetensors")}
    shards, order = [], []
    for k, shard in enumerate(layout["shards"]):
        specs = []
        for name in shard["tensors"]:
            if name not in table:
                raise DMergeError(f"export-safetensors: the zarr group at {location} has no tensor {name!r}")
            specs.append(table[name])
        header, offsets = build_header(specs, layout["metadata"])
        size = len(header) + (offsets[-1][1] if offsets else 0)
        shards.append(ShardPlan(name=shard["name"], header=header, size=size, tensors=list(range(len(order),
                                                                                                  len(order) + len(specs)))))
        order += [(k, name, len(header) + b) for (name, _, _), (b, _) in zip(specs, offsets)]
    def copy_tensor(k: int, name: str, offset: int) -> int:
        """Every byte of one array into its place; returns their count."""
        try:
                array = zarr.open_array(group.store, path=name, mode="r", zarr_format=3)
        except Exception as e:  # noqa: BLE001 - one line naming the array
            raise DMergeError(f"export-safetensors: cannot open array {name!r} of {location}: {e}") from None
        if tuple(array.shape) != table[name][2] or array.attrs.get(DTYPE_ATTRIBUTE) != table[name][1]:
            raise DMergeError(f"export-safetensors: array {name!r} of {location} is not the tensor the group's "
                              "attributes describe")
        path = output.shard_path(shards[k].name)
        if not array.shape:
            data = np.ascontiguousarray(array[()]).reshape(-1).view(np.uint8)
            write_range(path, offset, memoryview(data))
            return data.nbytes
        rows = array.shape[0]
        row_bytes = array.dtype.itemsize * math.prod(array.shape[1:])
        shard_rows = (array.shards or array.chunks)[0]
        step = max(1, EXPORT_BLOCK_BYTES // max(1, row_bytes * shard_rows)) * shard_rows
        done = 0
        for r0 in range(0, rows, step):
            data = np.ascontiguousarray(array[r0:min(rows, r0 + step)]).reshape(-1).view(np.uint8)
            write_range(path, offset + r0 * row_bytes, memoryview(data))
            done += data.nbytes
        return done

    output = LocalOutput(out_dir, overwrite=overwrite)
    written = 0
    try:
        output.prepare(shards)
        with ThreadPoolExecutor(max_workers=EXPORT_THREADS) as pool:
            # the arrays' reads wait on storage and release the GIL: several at once
            for n in pool.map(lambda job: copy_tensor(*job), order):
                written += n
                if progress is not None:
                    progress(n)
        output.commit_shards(shards)
        for name in attrs.get("files", []):
            output.write_bytes(name, _sync(group.store.get(name, prototype=_prototype())).to_bytes())
        output.write_index(layout["index"], layout.get("index_name", "model.safetensors.index.json"))
    except BaseException:
        output.abort()
        raise
    return {"shards": len(shards), "tensors": len(order), "bytes": written}


def _prototype():
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype()


__all__ = ["ZarrOutput", "ZarrArraySink", "ZarrEntry", "align_plan", "layout_of", "open_zarr_model",
           "read_zarr_rows", "export_safetensors", "is_zarr_group", "open_store", "FORMAT"]
