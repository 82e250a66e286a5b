"""A parent model folder: its config.json and the byte location of every tensor.

Opening a model reads metadata only: ``config.json``, the optional
``model.safetensors.index.json`` and the header of each shard (two small ranged reads
per shard). No tensor data is touched.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dmerge.errors import InputModelError
from dmerge.io import storage
from dmerge.io.safetensors_format import TensorEntry, parse_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class TensorLocation:
    """A tensor's file and byte span: everything a task needs to read rows of it."""

    file: str  # local path or URL
    entry: TensorEntry


@dataclass
class ModelSource:
    """Metadata of one parent model (no tensor data)."""

    reference: str  # as written in the recipe
    location: str  # resolved folder (local path or URL)
    config: dict
    tensors: dict[str, TensorLocation] = field(repr=False)

    @property
    def num_layers(self) -> int | None:
        return hidden_layer_count(self.config)

    def tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputModelError(f"model {self.reference} has no tensor {name!r}") from None


def hidden_layer_count(config: dict) -> int | None:
    """Number of decoder layers a HF config declares (text config for multimodal ones)."""
    cfg = config.get("text_config") or config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def _read_json(location: str, what: str, reference: str) -> dict:
    try:
        raw = storage.read_bytes(location)
    except FileNotFoundError:
        raise InputModelError(f"model {reference}: {what} not found at {location}") from None
    except Exception as e:  # network, permissions, bad URL
        raise InputModelError(f"model {reference}: cannot read {location}: {e}") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputModelError(f"model {reference}: {what} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputModelError(f"model {reference}: {what} is not a JSON object")
    return doc


def read_safetensors_header(file: str) -> tuple[dict[str, TensorEntry], dict]:
    """Read and validate the header of one safetensors file by byte range."""
    try:
        size = storage.file_size(file)
        prefix = bytes(storage.read_range(file, 0, min(8, size)))
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        header = bytes(storage.read_range(file, 8, n)) if 0 < n <= size - 8 else b""
    except FileNotFoundError:
        raise InputModelError(f"{file}: file not found") from None
    except InputModelError:
        raise
    except Exception as e:
        raise InputModelError(f"{file}: cannot read ({e})") from None
    return parse_header(prefix, header, size, file)


def open_model(reference: str, base_dir: str | None = None) -> ModelSource:
    """Open a parent model folder by recipe reference (path, URL or Hub id)."""
    if "+" in reference and not storage.is_url(reference):
        raise InputModelError(f"model {reference}: LoRA references (model+adapter) are not supported yet")
    location = storage.resolve_location(reference, base_dir)
    if not storage.is_url(location) and not storage.exists(location):
        raise InputModelError(f"model {reference}: folder {location} does not exist")
    from dmerge.io.zarr_store import is_zarr_group, open_zarr_model

    if is_zarr_group(location):  # a merge written with --output-format zarr
        return open_zarr_model(reference, location)
    config = _read_json(storage.join(location, "config.json"), "config.json", reference)

    index_file = storage.join(location, INDEX_NAME)
    single_file = storage.join(location, SINGLE_NAME)
    try:
        has_single = storage.exists(single_file)
        has_index = (not has_single) and storage.exists(index_file)
    except Exception as e:
        raise InputModelError(f"model {reference}: cannot reach {location}: {e}") from None
    if has_single:
        files = [SINGLE_NAME]
        weight_map = None
    elif has_index:
        index = _read_json(index_file, INDEX_NAME, reference)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputModelError(f"model {reference}: {INDEX_NAME} has no weight_map")
        for tensor_name, fname in weight_map.items():
            if not isinstance(fname, str) or not storage.is_inside(location, fname):
                raise InputModelError(
                    f"model {reference}: {INDEX_NAME} maps {tensor_name!r} to {fname!r}, outside the model folder"
                )
        files = sorted(set(weight_map.values()))
    else:
        raise InputModelError(
            f"model {reference}: no {SINGLE_NAME} or {INDEX_NAME} in {location} "
            "(only safetensors checkpoints are supported)"
        )

    paths = [storage.join(location, f) for f in files]
    # Headers are tiny; fetch them concurrently (matters for remote stores with latency).
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        headers = list(pool.map(read_safetensors_header, paths))

    tensors: dict[str, TensorLocation] = {}
    for fname, path, (entries, _meta) in zip(files, paths, headers):
        for name, entry in entries.items():
            if weight_map is not None:
                _check_indexed(reference, weight_map, name, fname)
            tensors[name] = TensorLocation(path, entry)
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise InputModelError(
                f"model {reference}: {INDEX_NAME} lists {missing[0]!r} in {weight_map[missing[0]]}, "
                "but that file has no such tensor"
            )
    return ModelSource(reference=reference, location=location, config=config, tensors=tensors)


def _check_indexed(reference: str, weight_map: dict, name: str, fname: str) -> None:
    """The index and the shard headers must agree every way round: a tensor in a shard
    that the index does not list, or lists in another shard, means a partial or corrupt
    checkpoint (transformers would load a different set of weights than dmerge merges)."""
    listed = weight_map.get(name)
    if listed is None:
        raise InputModelError(
            f"model {reference}: tensor {name!r} is in {fname} but not in {INDEX_NAME} "
            "(the index and the shards disagree: a partial or corrupt checkpoint?)"
        )
    if listed != fname:
        raise InputModelError(
            f"model {reference}: tensor {name!r} is in {fname} but {INDEX_NAME} puts it in {listed} "
            "(the index and the shards disagree: a partial or corrupt checkpoint?)"
        )
