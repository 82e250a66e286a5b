"""dmerge on worker processes against the in-process local cluster, same cores, same recipe.

For each method, one `dmerge run` each on:

* ``local``: the default in-process LocalCluster (one worker, a thread per core);
* ``nanny``: a `dask scheduler` + `dask worker --nworkers N --nthreads 1` (N = cores);
* ``bare``: the same with `--no-nanny` (N worker processes without the nanny's environment);
* ``bare+kill``: as ``bare``, one worker SIGKILLed a few seconds into the merge.

Reports wall time and the ratio to ``local``, and checks every output is byte-identical
to ``local``'s. Workers start before the timed run (a cluster is started once, used for
many merges).

    python benchmarks/bench_cluster.py --size 1.6gb --methods linear,ties
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_merge import RECIPES, SIZES  # noqa: E402

from dmerge.toymodels import write_family  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
    return h.hexdigest()


class Cluster:
    """A scheduler and N single-thread workers on 127.0.0.1."""

    def __init__(self, n: int, nanny: bool, memory_limit: str):
        from distributed import Client

        self.port = _port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        run = [sys.executable, "-m"]
        self.procs = [subprocess.Popen(run + ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                                              str(self.port), "--no-dashboard"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        worker = run + ["distributed.cli.dask_worker", self.address, "--nthreads", "1", "--no-dashboard",
                        "--memory-limit", memory_limit]
        if nanny:
            self.procs.append(subprocess.Popen(worker + ["--nworkers", str(n)], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        else:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
            for _ in range(n):
                self.procs.append(subprocess.Popen(worker + ["--no-nanny"], env=env, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while True:
            try:
                with Client(self.address, timeout="5s") as c:
                    if len(c.scheduler_info()["workers"]) >= n:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("cluster did not start")
            time.sleep(0.5)

    def worker_pids(self) -> list[int]:
        from distributed import Client

        with Client(self.address, timeout="10s") as c:
            return list(c.run(os.getpid).values())

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _merge(recipe: str, out: str, *extra: str, kill_after: float | None = None, pids=()) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(["dmerge", "run", recipe, out, "-q", *extra])
    if kill_after is not None:
        timer = threading.Timer(kill_after, lambda: os.kill(pids[0], signal.SIGKILL))
        timer.start()
    rc = proc.wait()
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"dmerge exited {rc}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1.6gb", choices=sorted(SIZES))
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--memory-limit", default="4GB")
    ap.add_argument("--kill-after", type=float, default=4.0)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    root = os.path.abspath(os.path.join(args.workdir, args.size))
    if not os.path.exists(os.path.join(root, "ft3", "config.json")):
        write_family(root, SIZES[args.size], n_fine_tunes=3)
    family = {k: os.path.join(root, k) for k in ("base", "ft1", "ft2", "ft3")}
    rows = []
    for method in args.methods.split(","):
        recipe = os.path.join(args.workdir, f"cluster-{method}.yml")
        with open(recipe, "w") as f:
            f.write(RECIPES[method].format(**family))
        out = os.path.join(args.workdir, "cluster-out")
        local = _merge(recipe, out)
        reference = _digest(out)
        rows.append((method, "local", local, True))
        for label, nanny, kill in (("bare", False, False), ("nanny", True, False), ("bare+kill", False, True)):
            cluster = Cluster(cores, nanny, args.memory_limit)
            try:
                pids = cluster.worker_pids()
                seconds = _merge(recipe, out, "--scheduler", cluster.address,
                                 kill_after=args.kill_after if kill else None, pids=pids)
            finally:
                cluster.close()
            rows.append((method, label, seconds, _digest(out) == reference))
            print(f"{method} {label}: {seconds:.1f} s", file=sys.stderr)
    print(f"\n{cores} cores; {args.size} family; workers: {cores} x 1 thread, --memory-limit {args.memory_limit}\n")
    print("| method | cluster | wall s | vs local | bytes identical |")
    print("|---|---|---|---|---|")
    base = {m: s for m, label, s, _ in rows if label == "local"}
    for method, label, seconds, same in rows:
        print(f"| {method} | {label} | {seconds:.1f} | {seconds / base[method]:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
