"""Optional fused CPU kernels (``gta.c``), built with the system C compiler on first use.

The task-arithmetic family (ties, dare_ties, breadcrumbs, task_arithmetic, ...) and
its radix-select statistic spend their time in many small elementwise tensor
operations; the C kernels do the same arithmetic per element in one pass, bit for bit
(see the contract at the top of ``gta.c``). They are an accelerator only: when no C
compiler is found, the build fails, ``DMERGE_NATIVE=0`` is set, or the tensors are not
on the CPU, the torch code path runs and gives the same bytes.

The shared library is cached per source hash and platform in ``$DMERGE_CACHE_DIR``
(default ``~/.cache/dmerge``), written atomically, so concurrent workers on one host
build it at most a few times and never load a half-written file. ``CC`` picks the
compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from dmerge.lazy import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gta.c")
ABI_VERSION = 5
# -ffp-contract=off: no fused multiply-add, which would round differently from torch.
CFLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# For the CPU it runs on: the kernels are loops over float64 and 64-bit integer lanes
# (the keyed random bits need 64-bit multiplies), which the baseline x86-64 target runs
# on two lanes at most. With AVX-512 here the ties/dare kernel went from 17.7 to 3.3 ns
# per element and linear's from 4.6 to 0.8. Vector code rounds exactly as scalar code
# (IEEE operations, nothing fused or reassociated), so the bytes do not change. The
# library is then cached per CPU model and feature set; where the compiler refuses
# the flag, the portable build is used. DMERGE_NATIVE_MARCH=0 builds the portable one.
NATIVE_ARCH_FLAGS = ["-march=native"]

_DTYPE_CODES: dict | None = None


def dtype_codes() -> dict:
    """torch dtype -> the kernels' dtype code (built on first use: importing this module
    does not import torch)."""
    global _DTYPE_CODES
    if _DTYPE_CODES is None:
        _DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
    return _DTYPE_CODES
MASK_ALL, MASK_NONE, MASK_WINDOW, MASK_RANDOM, MASK_BITS = 0, 1, 2, 3, 4
MAX_MODELS = 64

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


class Model(ctypes.Structure):
    """One task vector's input and keep-mask (``dm_model`` in gta.c)."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("mask", ctypes.c_int32),
        ("weight", ctypes.c_double),
        ("factor", ctypes.c_double),
        ("bottom", ctypes.c_int32),
        ("top", ctypes.c_int32),
        ("n_ties", ctypes.c_int32),
        ("tie_key", ctypes.c_int32 * 2),
        ("tie_next", ctypes.c_int64 * 2),
        ("lo", ctypes.c_int64),
        ("hi", ctypes.c_int64),
        ("key", ctypes.c_uint64),
        ("threshold", ctypes.c_int64),
        ("keep_bits", ctypes.c_void_p),
    ]


def enabled() -> bool:
    """Whether the kernels may be used at all (``DMERGE_NATIVE=0`` turns them off)."""
    return os.environ.get("DMERGE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("DMERGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dmerge")
    return Path(root) / "native"


def _cpu_identity() -> str | None:
    """The CPU model and feature flags (Linux), which a -march=native build depends on;
    None where they cannot be read (then only the portable build is made)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    wanted = ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
    found = [lines[k] for k in wanted if k in lines]
    return "\n".join(found) or None


def _arch_flags() -> list[str]:
    if os.environ.get("DMERGE_NATIVE_MARCH", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    return NATIVE_ARCH_FLAGS if _cpu_identity() else []


def library_path(arch_flags: list[str] | None = None) -> Path:
    """Where the library for this source, compiler flags and platform (and CPU, for a
    build tuned to it) is cached."""
    arch = _arch_flags() if arch_flags is None else arch_flags
    key = SOURCE.read_bytes() + " ".join(CFLAGS + arch).encode() + ((_cpu_identity() or "").encode() if arch else b"")
    tag = hashlib.sha256(key).hexdigest()[:16]
    plat = f"{sys.platform}-{platform.machine()}"
    return cache_dir() / f"gta-{tag}-{plat}.so"


def build(target: Path, arch_flags: list[str] | None = None) -> None:
    """Compile ``gta.c`` into ``target`` (atomically: a temporary file, then a rename)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc.split(), *CFLAGS, *(arch_flags or []), "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    arch = _arch_flags()
    path = library_path(arch)
    if arch and not path.exists():
        try:
            build(path, arch)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.info("dmerge: no build for this CPU (%s); building the portable kernels", exc)
            path = library_path([])
    if not path.exists():
        try:
            build(path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("dmerge: fused CPU kernels unavailable, using torch ops (%s)", exc)
            return None
    try:
        lib = ctypes.CDLL(str(path))  # CDLL (not PyDLL): calls release the GIL
    except OSError as exc:
        log.warning("dmerge: cannot load %s, using torch ops (%s)", path, exc)
        return None
    if lib.dm_abi_version() != ABI_VERSION:
        log.warning("dmerge: %s has the wrong ABI version, using torch ops", path)
        return None
    lib.dm_gta_merge.restype = ctypes.c_int64
    lib.dm_gta_merge.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64,
        ctypes.POINTER(Model), ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
        ctypes.c_double, ctypes.c_double, ctypes.c_void_p, ctypes.c_int32,
    ]
    lib.dm_masked_l1_rows.restype = ctypes.c_int
    lib.dm_masked_l1_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.POINTER(Model), ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.dm_gram_rows.restype = ctypes.c_int
    lib.dm_gram_rows.argtypes = [
        ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.dm_weighted_sum.restype = ctypes.c_int64
    lib.dm_weighted_sum.argtypes = [
        ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_double),
        ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_void_p, ctypes.c_int32,
    ]
    lib.dm_magnitude_histograms.restype = ctypes.c_int
    lib.dm_magnitude_histograms.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int32, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int32),
        ctypes.POINTER(ctypes.c_int32), ctypes.c_int32,
    ]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when unavailable or disabled."""
    global _lib, _tried
    if not enabled():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _load()
                _tried = True
    return _lib


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: enabled and built, on the CPU,
    contiguous, of a supported dtype."""
    return (all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in dtype_codes() for t in tensors)
            and library() is not None)


def gta_merge(base: torch.Tensor, models: list[Model], *, element_offset: int, consensus: bool, normalize: bool,
              total_weight: float, lam: float, out: torch.Tensor) -> int:
    """Run ``dm_gta_merge`` over all elements of ``base`` into ``out`` (same shape);
    returns how many outputs are NaN or infinite.

    ``models`` describe the task vectors (their ``data`` pointing at tensors shaped like
    ``base``, which the caller keeps alive)."""
    lib = library()
    assert lib is not None and base.shape == out.shape and 0 < len(models) <= MAX_MODELS
    array = (Model * len(models))(*models)
    rc = lib.dm_gta_merge(base.data_ptr(), dtype_codes()[base.dtype], base.numel(), element_offset,
                          array, len(models), int(consensus), int(normalize), float(total_weight),
                          float(lam), out.data_ptr(), dtype_codes()[out.dtype])
    if rc < 0:
        raise RuntimeError("dm_gta_merge: bad arguments")
    return rc


def masked_l1_rows(base, models: list[Model], rows: int, cols: int, element_offset: int,
                   keep_bits: bool) -> tuple:
    """Run ``dm_masked_l1_rows``: per row of the chunk (``rows`` x ``cols`` elements of
    ``base`` and of each model's ``data``), the sums of ``|x_i - base|`` and of its kept
    part, as a float64 tensor ``[rows, 2 * len(models)]``; with ``keep_bits``, also each
    model's drawn keep-mask as packed bits (a uint8 tensor, or None for a model whose
    mask is not random), for :data:`MASK_BITS` in the write pass of the same chunk."""
    lib = library()
    n = len(models)
    assert lib is not None and 0 < n <= MAX_MODELS and base.numel() == rows * cols
    out = torch.empty((rows, 2 * n), dtype=torch.float64)
    bits = [torch.empty((rows * cols + 7) // 8, dtype=torch.uint8) if keep_bits and m.mask == MASK_RANDOM else None
            for m in models]
    pointers = (ctypes.c_void_p * n)(*[b.data_ptr() if b is not None else None for b in bits])
    array = (Model * n)(*models)
    rc = lib.dm_masked_l1_rows(base.data_ptr(), dtype_codes()[base.dtype], rows, cols, element_offset, array, n,
                               out.data_ptr(), pointers)
    if rc != 0:
        raise RuntimeError("dm_masked_l1_rows: bad arguments")
    return out, bits


def gram_rows(tensors: list, rows: int, cols: int):
    """Run ``dm_gram_rows``: per row (``rows`` x ``cols`` elements of each tensor), the
    inner products of every pair ``i <= j``, a float64 tensor ``[rows, m (m + 1) / 2]``."""
    lib = library()
    m = len(tensors)
    assert lib is not None and 0 < m <= MAX_MODELS and all(t.numel() == rows * cols for t in tensors)
    out = torch.empty((rows, m * (m + 1) // 2), dtype=torch.float64)
    xs = (ctypes.c_void_p * m)(*[t.data_ptr() for t in tensors])
    dts = (ctypes.c_int32 * m)(*[dtype_codes()[t.dtype] for t in tensors])
    if lib.dm_gram_rows(xs, dts, m, rows, cols, out.data_ptr()) != 0:
        raise RuntimeError("dm_gram_rows: bad arguments")
    return out


def weighted_sum(tensors: list, weights: list[float], divisor: float | None, out) -> int:
    """Run ``dm_weighted_sum`` over all elements: ``out = (x_0 w_0 + x_1 w_1 + ...) [/ divisor]``
    in float64 (each product and sum rounded, in model order), rounded once to ``out``'s
    dtype; returns how many outputs are NaN or infinite. The tensors are shaped like
    ``out``, contiguous, on the CPU."""
    lib = library()
    n = len(tensors)
    assert lib is not None and 0 < n <= MAX_MODELS and len(weights) == n
    assert all(t.numel() == out.numel() for t in tensors)
    codes = dtype_codes()
    xs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors])
    dts = (ctypes.c_int32 * n)(*[codes[t.dtype] for t in tensors])
    ws = (ctypes.c_double * n)(*[float(w) for w in weights])
    rc = lib.dm_weighted_sum(xs, dts, ws, n, out.numel(), int(divisor is not None),
                             float(divisor if divisor is not None else 1.0), out.data_ptr(), codes[out.dtype])
    if rc < 0:
        raise RuntimeError("dm_weighted_sum: bad arguments")
    return rc


def magnitude_histograms(base: torch.Tensor, tensors: list[torch.Tensor], hists: list[torch.Tensor],
                         predicted: list[list[int]]) -> None:
    """Add the float32 magnitude keys of ``tensors[i] - base`` to ``hists[i]`` (int64,
    contiguous): coarse buckets, with the fine bins of ``predicted[i]``'s buckets after
    them (the layout of ``RankSelect._bin_index``)."""
    lib = library()
    assert lib is not None and len(tensors) == len(hists) == len(predicted) and 0 < len(tensors) <= MAX_MODELS
    for h in hists:
        assert h.dtype == torch.int64 and h.is_contiguous()
    n = len(tensors)
    width = max(1, max(len(p) for p in predicted))
    xs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors])
    dts = (ctypes.c_int32 * n)(*[dtype_codes()[t.dtype] for t in tensors])
    hs = (ctypes.c_void_p * n)(*[h.data_ptr() for h in hists])
    flat = [b for p in predicted for b in (list(p) + [-1] * (width - len(p)))]
    pb = (ctypes.c_int32 * len(flat))(*flat)
    npb = (ctypes.c_int32 * n)(*[len(p) for p in predicted])
    rc = lib.dm_magnitude_histograms(base.data_ptr(), dtype_codes()[base.dtype], xs, dts, n, base.numel(), hs,
                                     pb, npb, width)
    if rc != 0:
        raise RuntimeError("dm_magnitude_histograms: bad arguments")
