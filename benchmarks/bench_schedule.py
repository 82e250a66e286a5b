"""What scheduling a 405B-shaped TIES merge costs: tasks, graph build, submission, memory.

Three Llama-3.1-405B-shaped parents are written as real safetensors headers followed by a
sparse hole (as ``bench_plan.py`` does). The merge is planned, its graph built, and the
graph submitted to a real ``dask scheduler`` process on 127.0.0.1 that has no workers, so
what is measured is the client and the scheduler alone: the time from ``client.get`` until
the scheduler holds every task, and both processes' resident memory after.

    python benchmarks/bench_schedule.py [--chunk-size 512M] [--workdir bench-work]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmerge.allocator import resident_bytes  # noqa: E402
from dmerge.execute import TASKS_PER_WAVE, run_id  # noqa: E402
from dmerge.graph import build_graph, waves  # noqa: E402
from dmerge.io.sinks import LocalShard  # noqa: E402
from dmerge.plan import build_plan  # noqa: E402
from dmerge.recipe import load_recipe  # noqa: E402
from dmerge.toymodels import LLAMA_405B, write_sparse_model  # noqa: E402
from dmerge.units import format_bytes, parse_size  # noqa: E402

RECIPE = """
merge_method: ties
base_model: {0}
models:
  - model: {1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--chunk-size", default="512M")
    args = ap.parse_args()
    root = os.path.abspath(os.path.join(args.workdir, "405b"))
    parents = []
    for i in range(3):
        folder = os.path.join(root, f"p{i}")
        if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
            write_sparse_model(folder, LLAMA_405B)
        parents.append(folder)

    t0 = time.perf_counter()
    plan = build_plan(load_recipe(RECIPE.format(*parents), is_text=True), chunk_bytes=parse_size(args.chunk_size))
    t1 = time.perf_counter()
    dsk, keys = build_graph(plan, [LocalShard(f"/nowhere/{s.name}") for s in plan.shards], run_id(plan, "/nowhere"))
    t2 = time.perf_counter()
    print(f"chunk budget {args.chunk_size}: {len(plan.tensors)} tensors, {len(keys)} writes, {len(dsk)} tasks")
    print(f"plan {t1 - t0:.2f} s, graph {t2 - t1:.2f} s")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from distributed import Client

        client = Client(f"tcp://127.0.0.1:{port}", timeout="60s")
        before = _rss_of(scheduler.pid)
        first_dsk, first_keys, _ = waves(dsk, keys, TASKS_PER_WAVE)[0]
        t3 = time.perf_counter()
        first = client.get(first_dsk, first_keys, sync=False)
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) < len(first_dsk):
            time.sleep(0.02)
        print(f"first wave ({len(first_dsk)} tasks) held after {time.perf_counter() - t3:.2f} s: the work can start")
        client.cancel(first)
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            time.sleep(0.02)
        t3 = time.perf_counter()
        futures = client.get(dsk, keys, sync=False)
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) < len(dsk):
            time.sleep(0.05)
        t4 = time.perf_counter()
        print(f"whole graph submitted at once: held after {t4 - t3:.2f} s")
        print(f"scheduler RSS {format_bytes(_rss_of(scheduler.pid))} (idle {format_bytes(before)}), "
              f"client RSS {format_bytes(resident_bytes())}")
        client.cancel(futures)
        client.close()
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)


if __name__ == "__main__":
    main()
