"""How long and how much memory planning takes for three Llama-3.1-405B-shaped parents.

The parents are written as real safetensors headers followed by a sparse hole (810 GB
apparent size each, almost no disk), so only planning, which reads headers, is measured.

    python benchmarks/bench_plan.py [--workdir bench-work]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmerge.plan import build_plan  # noqa: E402
from dmerge.recipe import load_recipe  # noqa: E402
from dmerge.toymodels import LLAMA_405B, write_sparse_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="bench-work")
    args = ap.parse_args()
    root = os.path.abspath(os.path.join(args.workdir, "405b"))
    parents = []
    for i in range(3):
        folder = os.path.join(root, f"p{i}")
        if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
            write_sparse_model(folder, LLAMA_405B)
        parents.append(folder)
    recipe_path = os.path.join(root, "ties.yml")
    with open(recipe_path, "w") as f:
        f.write(f"""merge_method: task_arithmetic
base_model: {parents[0]}
models:
  - model: {parents[1]}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {parents[2]}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    plan = build_plan(load_recipe(recipe_path), chunk_bytes=256 << 20)
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(plan.summary().split("\n  model-")[0])
    print(f"\nplan built in {seconds:.2f} s; peak RSS {rss1 / 1024:.0f} MiB (+{(rss1 - rss0) / 1024:.0f} MiB while planning)")


if __name__ == "__main__":
    main()
