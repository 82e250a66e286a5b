"""The safetensors container format: parse and validate headers, build output headers.

A file is ``u64 little-endian N`` + ``N`` bytes of JSON + the tensor data. Each JSON entry
gives ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` relative to the end of the
header. Tensors are row-major and contiguous, so rows ``[r0, r1)`` of any tensor are the
single byte range ``begin + r0 * row_bytes .. begin + r1 * row_bytes``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from dmerge.errors import InputModelError

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_OF: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# Recipe spellings of dtypes (mergekit accepts these) -> safetensors code.
DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float": "F32",
    "fp32": "F32",
    "float16": "F16",
    "half": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}
TORCH_NAME: dict[str, str] = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


def itemsize(code: str) -> int:
    return torch.empty((), dtype=DTYPES[code]).element_size()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live inside one safetensors file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of the leading axis (1 for scalars)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def parse_header(prefix: bytes, header: bytes, file_size: int, where: str) -> tuple[dict[str, TensorEntry], dict]:
    """Validate a safetensors header and return its entries and ``__metadata__``.

    ``prefix`` is the 8-byte length field, ``header`` the JSON bytes, ``file_size`` the
    file's total size (used to detect truncation). ``where`` names the file in errors.
    """
    if len(prefix) != 8:
        raise InputModelError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size or len(header) != n:
        raise InputModelError(f"{where}: malformed safetensors header (header length {n}, file size {file_size})")
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputModelError(f"{where}: malformed safetensors header JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputModelError(f"{where}: malformed safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in doc.items():
        try:
            code = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputModelError(f"{where}: malformed entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise InputModelError(f"{where}: tensor {name!r} has unsupported dtype {code}")
        if any(s < 0 for s in shape) or e < b or e - b != math.prod(shape) * itemsize(code):
            raise InputModelError(f"{where}: tensor {name!r} has inconsistent shape/offsets {list(shape)} [{b}, {e})")
        entries[name] = TensorEntry(name, code, shape, data_start + b, data_start + e)
        spans.append((b, e))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise InputModelError(f"{where}: malformed safetensors file (tensor data not contiguous at offset {b})")
        pos = e
    if data_start + pos > file_size:
        raise InputModelError(
            f"{where}: truncated safetensors file ({file_size} bytes, header promises {data_start + pos})"
        )
    return entries, metadata


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Build a safetensors header for tensors laid out in the given order.

    Returns the full header bytes (length prefix + JSON padded with spaces to a multiple
    of 8, as the reference writer does) and each tensor's ``[begin, end)`` data offsets
    relative to the end of the header.
    """
    doc: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets = []
    pos = 0
    for name, code, shape in tensors:
        nbytes = math.prod(shape) * itemsize(code)
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
