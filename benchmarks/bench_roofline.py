"""How far each merge method is from what this machine can do at all (its floor).

For each method's recipe (the same recipes as bench_merge.py) the plan says how many
bytes a merge must read (every parent byte it uses, once) and write (the output). The
machine is measured on the same run:

* page-cache read bandwidth: the parent files, already cached, mapped and read by all
  cores at once (dmerge reads local parents through memory maps);
* page-cache write bandwidth: ``pwrite`` of the output's size into preallocated files
  (as dmerge's tasks write their rows), by all cores at once;
* a memory-bound kernel: ``c = a + b`` over arrays far larger than the caches (bytes
  moved per second, all cores), the speed of the simplest arithmetic pass.

The floor is ``read / read bandwidth + write / write bandwidth``: moving the bytes,
with no arithmetic and no start-up. Beside it: dmerge's wall time for the whole
command, its merge phase (what ``dmerge run`` reports: after planning and start-up),
the bytes it really read (statistics passes read again), and the ratios.

    python benchmarks/bench_roofline.py --parents bench-work/1.6gb --workdir /tmp/roofline \\
        [--methods linear,ties,dare_ties,slerp,passthrough] [--repeat 2]

``--parents`` holds base, ft1, ft2 and ft3 (bench_merge.py writes them); outputs go to
``--workdir``. Run it on a quiet machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_merge import RECIPES, parent_bytes, warm  # noqa: E402
from dmerge.units import parse_size  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parallel(work: list, fn) -> float:
    """Run ``fn(item)`` for every item on CORES threads; wall seconds."""
    items = list(work)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not items:
                    return
                item = items.pop()
            fn(item)

    threads = [threading.Thread(target=worker) for _ in range(CORES)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def read_bandwidth(files: list[str], piece: int = 64 << 20) -> float:
    """Bytes per second reading cached files through memory maps (numpy sums the words:
    every page is touched and every byte loaded), all cores."""
    pieces = []
    total = 0
    for f in files:
        size = os.path.getsize(f)
        for start in range(0, size - size % 8, piece):
            n = min(piece, size - start) // 8 * 8
            pieces.append((f, start, n))
            total += n

    def read(p):
        f, start, n = p
        fd = os.open(f, os.O_RDONLY)
        try:
            m = mmap.mmap(fd, n + start % mmap.ALLOCATIONGRANULARITY, prot=mmap.PROT_READ,
                          offset=start - start % mmap.ALLOCATIONGRANULARITY)
        finally:
            os.close(fd)
        try:
            np.frombuffer(m, dtype=np.uint64, count=n // 8, offset=start % mmap.ALLOCATIONGRANULARITY).sum()
        finally:
            m.close()

    return total / _parallel(pieces, read)


def write_bandwidth(folder: str, nbytes: int, piece: int = 32 << 20) -> float:
    """Bytes per second writing ``nbytes`` with pwrite into preallocated files (one per
    core), all cores; the files are removed afterwards."""
    os.makedirs(folder, exist_ok=True)
    per = nbytes // CORES // piece * piece or piece
    paths = [os.path.join(folder, f"bw-{i}.bin") for i in range(CORES)]
    for p in paths:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.posix_fallocate(fd, 0, per)
        os.close(fd)
    data = memoryview(np.random.default_rng(0).integers(0, 255, piece, dtype=np.uint8).tobytes())
    jobs = [(p, at) for p in paths for at in range(0, per, piece)]

    def write(job):
        p, at = job
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, data, at)
        finally:
            os.close(fd)

    try:
        seconds = _parallel(jobs, write)
    finally:
        for p in paths:
            os.unlink(p)
    return per * CORES / seconds


def stream_bandwidth(n: int = 1 << 26) -> float:
    """Bytes per second of ``c = a + b`` (float32, 256 MiB arrays: 3 x 256 MiB moved per
    pass), all cores each on its own slice."""
    a = np.ones(n, dtype=np.float32)
    b = np.ones(n, dtype=np.float32)
    c = np.empty(n, dtype=np.float32)
    np.add(a, b, out=c)  # fault the pages in
    step = -(-n // CORES)
    slices = [slice(i, min(n, i + step)) for i in range(0, n, step)]
    best = 0.0
    for _ in range(3):
        seconds = _parallel(list(slices), lambda s: np.add(a[s], b[s], out=c[s]))
        best = max(best, 3 * 4 * n / seconds)
    return best


def run_dmerge(recipe: str, out: str, extra: list[str]) -> dict:
    """One ``dmerge run``: wall seconds, its merge phase, bytes read, and the CPU seconds
    (user + system) the process used."""
    import resource

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dmerge.cli", "run", recipe, out, "--overwrite", *extra],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    m = re.search(r"in ([\d.]+) s.*\(([^,]+) read, .*?(\d+) tasks", done.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "merge": float(m[1]), "read": parse_size(m[2].replace(" ", "")), "cpu": cpu}


def plan_bytes(recipe: str) -> tuple[int, int]:
    """(bytes a merge must read: each source tensor once; bytes it writes)."""
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    plan = build_plan(load_recipe(recipe))
    read = sum(t.bytes_read for t in plan.tensors)
    write = sum(t.nbytes for t in plan.tensors) + sum(len(s.header) for s in plan.shards)
    return read, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parents", required=True, help="folder with base, ft1, ft2, ft3")
    ap.add_argument("--workdir", required=True, help="recipes and outputs are written here")
    ap.add_argument("--methods", default="linear,ties,dare_ties,slerp,passthrough")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dmerge-args", default="")
    args = ap.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    folders = {n: os.path.abspath(os.path.join(args.parents, n)) for n in ("base", "ft1", "ft2", "ft3")}
    files = [os.path.join(f, n) for f in folders.values() for n in sorted(os.listdir(f)) if n.endswith(".safetensors")]
    with open(os.path.join(folders["base"], "config.json")) as f:
        layers = int(__import__("json").load(f)["num_hidden_layers"])

    warm(list(folders.values()))
    read_bw = read_bandwidth(files)
    write_bw = write_bandwidth(os.path.join(args.workdir, "bandwidth"), parent_bytes([folders["base"]]))
    kernel_bw = stream_bandwidth()
    load = os.getloadavg()
    print(f"machine: {CORES} cores; page-cache read {read_bw / 1e9:.2f} GB/s, page-cache write "
          f"{write_bw / 1e9:.2f} GB/s, c = a + b {kernel_bw / 1e9:.2f} GB/s; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")

    rows = []
    for method in args.methods.split(","):
        text = RECIPES[method].format(**folders, layers=layers, quarter=layers // 4, three_quarters=3 * layers // 4)
        recipe = os.path.join(args.workdir, f"{method}.yml")
        with open(recipe, "w") as f:
            f.write(text)
        used = [f for f in folders.values() if f in text]
        must_read, must_write = plan_bytes(recipe)
        floor = must_read / read_bw + must_write / write_bw
        runs = []
        for _ in range(args.repeat):
            warm(used)
            runs.append(run_dmerge(recipe, os.path.join(args.workdir, f"out-{method}"), args.dmerge_args.split()))
        wall = statistics.median(r["wall"] for r in runs)
        merge = statistics.median(r["merge"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        rows.append((method, must_read, must_write, runs[0]["read"], floor, wall, merge, cpu))
        print(f"{method}: floor {floor:.2f} s, dmerge {wall:.2f} s (merge phase {merge:.2f} s), runs "
              f"{', '.join(format(r['wall'], '.2f') for r in runs)}", file=sys.stderr)

    # CPU / cores: the wall time the work would take with every core busy all along; close
    # to the wall time, the merge is bound by its computation, not by waiting
    print("| method | must read | must write | dmerge read | floor | dmerge wall | merge phase | CPU s (/ cores) | "
          "wall / floor | merge phase / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, r, w, dr, floor, wall, merge, cpu in rows:
        print(f"| {method} | {r / 1e9:.2f} GB | {w / 1e9:.2f} GB | {dr / 1e9:.2f} GB | {floor:.2f} s | {wall:.2f} s | "
              f"{merge:.2f} s | {cpu:.1f} ({cpu / CORES:.1f}) | {wall / floor:.1f}x | {merge / floor:.1f}x |")


if __name__ == "__main__":
    main()
