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

from dmerge.errors import InputModelError

# safetensors dtype code -> bytes per element. Plain data: reading headers and planning
# never import torch (the torch dtype of a code: dmerge.numerics.torch_dtype).
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
# the same codes by torch's dtype names (torch.<name>)
TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Floating codes in torch's promotion order (a wider one wins; F16 with BF16 gives F32);
# float8 codes promote with nothing but themselves.
_FLOAT_RANK = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}

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
    """Bytes per element of a safetensors dtype code."""
    return ITEMSIZE[code]


def promote_codes(a: str, b: str) -> str | None:
    """The dtype code torch's type promotion gives for tensors of codes ``a`` and ``b``
    when ``a`` is floating (``torch.promote_types``; tests compare every pair), or None
    where torch refuses (float8 with another type)."""
    if a == b:
        return a
    if a.startswith("F8") or b.startswith("F8"):
        return None
    if b not in _FLOAT_RANK:  # an integer or bool: the floating type wins
        return a
    ra, rb = _FLOAT_RANK[a], _FLOAT_RANK[b]
    if ra == rb:  # F16 with BF16
        return "F32"
    return a if ra > rb else b


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
        if code not in ITEMSIZE:
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


def __getattr__(name: str):
    """``DTYPES`` (code -> torch dtype) and ``CODE_OF`` (torch dtype -> code), as this
    module had them, built on first use: only code that already works with torch
    tensors asks for them, and importing this module does not import torch."""
    if name in ("DTYPES", "CODE_OF"):
        import torch

        dtypes = {code: getattr(torch, torch_name) for code, torch_name in TORCH_DTYPE_NAMES.items()}
        return dtypes if name == "DTYPES" else {v: k for k, v in dtypes.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
