"""Byte sizes on the command line and in what dmerge prints: one system for both.

Parsing (``--chunk-size``, ``--out-shard-size``, ``--memory-limit``):

* ``K``, ``M``, ``G``, ``T`` and ``KiB``, ``MiB``, ``GiB``, ``TiB`` are binary: ``128M`` is
  128 × 2^20 bytes (unlike Dask, which reads a bare ``M`` as 10^6);
* ``KB``, ``MB``, ``GB``, ``TB`` are decimal (SI), as in Dask: ``4GB`` is 4 × 10^9 bytes;
* ``B`` alone means *billion* bytes, mergekit's ``--out-shard-size 5B`` convention;
* a plain number is bytes. Case does not matter.

Printing (:func:`format_bytes`) is always binary with IEC names, so a size typed with a
binary suffix prints back as typed: ``128M`` prints as ``128 MiB``.
"""

import re

_SUFFIX = {
    "": 1,
    "B": 1_000_000_000,  # mergekit: "5B" = five billion bytes
    "K": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TIB": 1 << 40,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}

# One line for --help wherever a SIZE is taken.
SIZE_HELP = ("Sizes: K/M/G/T = KiB/MiB/GiB/TiB (powers of 1024); KB/MB/GB/TB = powers of 1000; "
             "5B = five billion bytes (mergekit's convention).")

_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: "str | int | float") -> int:
    """Parse a size such as ``"64K"``, ``"1.5G"``, ``"500MB"``, ``"5B"`` or ``4096`` into bytes.

    See the module docstring for the suffixes: binary for ``K``/``M``/``G``/``T`` and
    ``KiB``..., decimal for ``KB``/``MB``/..., billions for ``B``.
    """
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SUFFIX:
        raise ValueError(f"cannot parse size {text!r} (examples: 64K, 256M, 2G, 500MB, 5B)")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Format a byte count for people, in binary units: 12 B, 64 KiB, 128 MiB, 1.5 GiB.

    One decimal, dropped when it is zero, so a size typed as ``128M`` prints as ``128 MiB``.
    """
    value = float(n)
    for unit in _IEC_UNITS:
        # Move up while the value, as it would print, is still 1024 or more.
        if unit == _IEC_UNITS[-1] or abs(round(value, 1)) < 1024:
            break
        value /= 1024
    if unit == "B":
        return f"{value:.0f} B"
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text} {unit}"
