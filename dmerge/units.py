"""Human sizes: "64K", "256M", "5B" (bytes, as mergekit's --out-shard-size)."""

import re

_SUFFIX = {
    "": 1,
    "B": 1_000_000_000,  # mergekit: "5B" = five billion bytes
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
    "TIB": 1 << 40,
}


def parse_size(text: "str | int | float") -> int:
    """Parse a size such as ``"64K"``, ``"1.5G"``, ``"5B"`` or ``4096`` into bytes.

    ``K``/``M``/``G``/``T`` are binary (KiB, MiB, ...). ``B`` alone follows mergekit's
    ``--out-shard-size`` convention and means *billion* bytes.
    """
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SUFFIX:
        raise ValueError(f"cannot parse size {text!r} (examples: 64K, 256M, 2G, 5B)")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Format a byte count for people: 1.6 GB, 340 MB, 12 KB."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
