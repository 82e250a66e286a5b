"""zarr v3 data types for the float formats numpy lacks: bfloat16 and two float8s.

zarr-python 3.1 knows no bfloat16 (numpy has none), yet most LLM weights are bf16.
dmerge writes such arrays with the data type names other zarr v3 implementations
already read (tensorstore, zarrs): ``"bfloat16"`` as the zarr-extensions registry
specifies it, ``"float8_e5m2"`` (registered there too) and ``"float8_e4m3fn"``
(tensorstore's name for torch's ``float8_e4m3fn``, safetensors' ``F8_E4M3``; the
registry's ``float8_e4m3`` is another format, with infinities). The bytes on disk are
the IEEE-style bit patterns, little-endian, exactly as safetensors stores them.

zarr-python is taught these names through its data type registry
(:func:`register`; also declared as ``zarr.data_type`` entry points in
pyproject.toml, so with dmerge installed a plain ``import zarr`` reads them). In memory
an element is its bit pattern: a ``uint16`` (bf16) or ``uint8`` (float8) numpy array,
which ``torch.from_numpy(a).view(torch.bfloat16)`` turns into values without a copy.
No numpy dtype is claimed (``from_native_dtype`` never matches), so creating a plain
``uint16`` array still gives a zarr ``uint16``.

This module imports only numpy and zarr: zarr loads it through the entry points.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize
from zarr.core.dtype.npy.common import endianness_to_numpy_str
from zarr.core.dtype.wrapper import ZDType


class _BitPatternFloat(ZDType, HasItemSize):
    """A float format held in memory as its unsigned-integer bit pattern."""

    _zarr_v3_name: ClassVar[str]
    _bits_dtype: ClassVar[str]  # numpy dtype of the bit pattern ("u2", "u1")
    _nan_bits: ClassVar[int]  # the canonical NaN ("NaN" as a fill value)
    _inf_bits: ClassVar[int | None]  # +inf (None: the format has no infinity)

    @classmethod
    def from_native_dtype(cls, dtype):
        # Never inferred from a numpy dtype: a uint16 array must stay uint16.
        raise DataTypeValidationError(f"{cls._zarr_v3_name} is never inferred from the numpy dtype {dtype}")

    def to_native_dtype(self):
        return np.dtype(self._bits_dtype)

    @classmethod
    def _from_json_v2(cls, data):
        raise DataTypeValidationError(f"{cls._zarr_v3_name} is a zarr v3 data type only")

    @classmethod
    def _from_json_v3(cls, data):
        if data == cls._zarr_v3_name or (isinstance(data, dict) and data.get("name") == cls._zarr_v3_name
                                         and not data.get("configuration")):
            return cls()
        raise DataTypeValidationError(f"not {cls._zarr_v3_name}: {data!r}")

    def to_json(self, zarr_format):
        if zarr_format != 3:
            raise ValueError(f"{self._zarr_v3_name} exists in zarr v3 only")
        return self._zarr_v3_name

    @property
    def item_size(self) -> int:
        return np.dtype(self._bits_dtype).itemsize

    # -- scalars (the fill value): bit patterns in memory ----------------------------

    def _check_scalar(self, data) -> bool:
        return isinstance(data, (int, float, np.integer, np.floating)) and not isinstance(data, bool)

    def cast_scalar(self, data):
        if isinstance(data, (float, np.floating)):
            return np.dtype(self._bits_dtype).type(self._bits_of(float(data)))
        if self._check_scalar(data):
            return np.dtype(self._bits_dtype).type(int(data))
        raise TypeError(f"cannot use {data!r} as a {self._zarr_v3_name} value")

    def default_scalar(self):
        return np.dtype(self._bits_dtype).type(0)

    def from_json_scalar(self, data, *, zarr_format):
        """A fill value as the zarr v3 core spec writes floats: a number, "NaN",
        "Infinity", "-Infinity", or the bit pattern as a "0x..." hex string."""
        if isinstance(data, str):
            if data.startswith("0x"):
                return np.dtype(self._bits_dtype).type(int(data, 16))
            special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
            if data in special:
                return np.dtype(self._bits_dtype).type(self._bits_of(special[data]))
        elif isinstance(data, (int, float)) and not isinstance(data, bool):
            return np.dtype(self._bits_dtype).type(self._bits_of(float(data)))
        raise TypeError(f"invalid {self._zarr_v3_name} fill value {data!r}")

    def to_json_scalar(self, data, *, zarr_format):
        bits = int(data)
        if bits == 0:
            return 0.0
        if bits == 1 << (8 * self.item_size - 1):
            return -0.0
        return f"0x{bits:0{2 * self.item_size}x}"  # exact for every pattern

    def _bits_of(self, value: float) -> int:
        if math.isnan(value):
            return self._nan_bits
        if value == 0.0:
            return (1 << (8 * self.item_size - 1)) if math.copysign(1.0, value) < 0 else 0
        if math.isinf(value) and self._inf_bits is not None:
            return self._inf_bits | ((1 << (8 * self.item_size - 1)) if value < 0 else 0)
        return self._finite_bits(value)

    def _finite_bits(self, value: float) -> int:
        raise TypeError(f"{self._zarr_v3_name} fill values other than 0, NaN and infinities are given as '0x..' bits")


@dataclass(frozen=True, kw_only=True)
class BFloat16(_BitPatternFloat, HasEndianness):
    """zarr-extensions ``bfloat16``: the top 16 bits of an IEEE binary32."""

    _zarr_v3_name: ClassVar[str] = "bfloat16"
    _bits_dtype: ClassVar[str] = "u2"
    _nan_bits: ClassVar[int] = 0x7FC0
    _inf_bits: ClassVar[int | None] = 0x7F80
    dtype_cls = np.dtypes.UInt16DType

    def to_native_dtype(self):
        return np.dtype("u2").newbyteorder(endianness_to_numpy_str(self.endianness))

    def _finite_bits(self, value: float) -> int:
        (u,) = struct.unpack("<I", struct.pack("<f", value))
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF  # round to nearest even


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(_BitPatternFloat):
    """torch's ``float8_e4m3fn`` (safetensors ``F8_E4M3``): no infinities, NaN is S.1111.111."""

    _zarr_v3_name: ClassVar[str] = "float8_e4m3fn"
    _bits_dtype: ClassVar[str] = "u1"
    _nan_bits: ClassVar[int] = 0x7F
    _inf_bits: ClassVar[int | None] = None
    dtype_cls = np.dtypes.UInt8DType


@dataclass(frozen=True, kw_only=True)
class Float8E5M2(_BitPatternFloat):
    """zarr-extensions ``float8_e5m2`` (safetensors ``F8_E5M2``)."""

    _zarr_v3_name: ClassVar[str] = "float8_e5m2"
    _bits_dtype: ClassVar[str] = "u1"
    _nan_bits: ClassVar[int] = 0x7E
    _inf_bits: ClassVar[int | None] = 0x7C
    dtype_cls = np.dtypes.UInt8DType


BIT_PATTERN_TYPES = (BFloat16, Float8E4M3FN, Float8E5M2)


def register() -> None:
    """Teach this process's zarr the data types above (idempotent)."""
    for cls in BIT_PATTERN_TYPES:
        data_type_registry.register(cls._zarr_v3_name, cls)


register()

__all__ = ["BFloat16", "Float8E4M3FN", "Float8E5M2", "BIT_PATTERN_TYPES", "register"]
