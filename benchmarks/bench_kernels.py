"""Nanoseconds per output element of each fused kernel, one thread, on one MLP-sized tensor.

The tensors (5632 x 2048, bf16: the 1.6 GB family's MLP matrices) are in memory, so
this is the arithmetic and the memory traffic of one pass, without page faults, reads
from storage or writes to files. Beside them, the engine's other per-element costs: the
journal's CRC-32 of the output bytes and a streaming copy of them.

    python benchmarks/bench_kernels.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmerge import native  # noqa: E402
from dmerge.methods import _sparsify as sp  # noqa: E402

ROWS, COLS = 5632, 2048


def best(fn, repeat: int) -> float:
    """Best of ``repeat`` runs, nanoseconds per element."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / (ROWS * COLS) * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if native.library() is None:
        sys.exit("the fused kernels are not available (no C compiler?)")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, COLS, generator=g).bfloat16()
    fts = [(base.float() + 0.01 * torch.randn(ROWS, COLS, generator=g)).bfloat16() for _ in range(3)]
    out = torch.empty(ROWS, COLS, dtype=torch.bfloat16)

    def models(mask: int) -> list:
        ms = []
        for i, f in enumerate(fts):
            m = native.Model(data=f.data_ptr(), dtype=native.dtype_codes()[f.dtype], mask=mask, weight=0.3, factor=1.0)
            m.key, m.threshold = sp.stream_key(0, "t", i + 1), sp.keep_threshold(0.5)
            ms.append(m)
        return ms

    random = models(native.MASK_RANDOM)
    _, bits = native.masked_l1_rows(base, random, ROWS, COLS, 0, keep_bits=True)
    from_bits = models(native.MASK_BITS)
    for m, b in zip(from_bits, bits):
        m.keep_bits = b.data_ptr()
    hists = [torch.zeros(sp.COARSE_BINS + sp.FINE_BINS, dtype=torch.int64) for _ in fts]
    raw = memoryview(out.view(-1).view(torch.uint8).numpy())
    copy = torch.empty_like(out)
    rows = [
        ("linear: weighted sum of 3 sources", lambda: native.weighted_sum(fts, [0.4, 0.3, 0.3], 1.0, out)),
        ("slerp: Gram rows of 2 sources", lambda: native.gram_rows(fts[:2], ROWS, COLS)),
        ("slerp: weighted sum of 2 sources", lambda: native.weighted_sum(fts[:2], [0.6, 0.5], None, out)),
        ("task_arithmetic: write pass, 3 task vectors", lambda: native.gta_merge(
            base, models(native.MASK_ALL), element_offset=0, consensus=False, normalize=False, total_weight=0.9,
            lam=1.0, out=out)),
        ("ties: magnitude histograms, 3 task vectors", lambda: native.magnitude_histograms(
            base, fts, hists, [[16000]] * 3)),
        ("dare: rescale statistic (draws the masks), 3 task vectors", lambda: native.masked_l1_rows(
            base, random, ROWS, COLS, 0, keep_bits=True)),
        ("dare_ties: write pass, masks drawn again", lambda: native.gta_merge(
            base, random, element_offset=0, consensus=True, normalize=False, total_weight=0.9, lam=1.0, out=out)),
        ("dare_ties: write pass, the statistic's mask bits", lambda: native.gta_merge(
            base, from_bits, element_offset=0, consensus=True, normalize=False, total_weight=0.9, lam=1.0, out=out)),
        ("engine: CRC-32 of the bf16 output (zlib)", lambda: zlib.crc32(raw)),
        ("engine: copy of the bf16 output", lambda: copy.copy_(out)),
    ]
    print(f"one thread, {ROWS} x {COLS} bf16, best of {args.repeat}\n")
    print("| kernel | ns per element |")
    print("|---|---|")
    for name, fn in rows:
        fn()  # first touch of every buffer
        print(f"| {name} | {best(fn, args.repeat):.2f} |")


if __name__ == "__main__":
    main()
