"""Time `dmerge run` against `mergekit-yaml` on the same recipe, same machine, one run.

Generates a Llama-shaped family (base + 3 fine-tunes, bf16) of the chosen size once,
then for each method runs both tools as subprocesses, sampling the resident memory of
each process tree (all processes summed) every 20 ms. Reports wall time, peak RSS,
GB/s of parent bytes read and the dmerge/mergekit time ratio as a Markdown table.

    python benchmarks/bench_merge.py --size 1.6gb --methods linear,ties,dare_ties,slerp

``--parents DIR`` takes an existing family (base, ft1, ft2, ft3; read only) instead of
generating one; recipes and outputs then go to ``--workdir``. dmerge runs as
``python -m dmerge.cli`` with this checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmerge.toymodels import LlamaShape, write_family  # noqa: E402

SIZES = {
    # ~1.6 GB per model in bf16: TinyLlama's widths with 16 layers
    "1.6gb": LlamaShape(hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "400mb": LlamaShape(hidden=1024, layers=16, intermediate=2816, heads=16, kv_heads=4, vocab=32000),
    "tiny": LlamaShape(hidden=256, layers=4, intermediate=688, heads=8, kv_heads=2, vocab=4096),
}

RECIPES = {
    "linear": """merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.3}}
dtype: bfloat16
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: -0.2}}
dtype: bfloat16
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.5}}
dtype: bfloat16
""",
    "slerp": """merge_method: slerp
base_model: {ft1}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "passthrough": """merge_method: passthrough
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, {three_quarters}]
  - sources:
      - model: {ft2}
        layer_range: [{quarter}, {layers}]
dtype: bfloat16
""",
}


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall time and the peak of the summed RSS of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')[-3000:]}")
    return {"wall": wall, "peak_rss": peak}


def parent_bytes(folders: list[str]) -> int:
    return sum(os.path.getsize(os.path.join(f, n)) for f in folders for n in os.listdir(f) if n.endswith(".safetensors"))


def warm(folders: list[str]) -> None:
    """Read every parent file once so both tools start with the same (warm) page cache."""
    for f in folders:
        for n in os.listdir(f):
            with open(os.path.join(f, n), "rb") as fh:
                while fh.read(64 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.6gb")
    ap.add_argument("--methods", default="linear")
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--parents", help="an existing family folder (base, ft1, ft2, ft3), used read-only")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--dmerge-args", default="", help="extra arguments for dmerge run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (alternating); the median is reported")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()

    root = os.path.join(args.workdir, args.size)
    names = ["base", "ft1", "ft2", "ft3"]
    folders = {n: os.path.abspath(os.path.join(args.parents or root, n)) for n in names}
    os.makedirs(root, exist_ok=True)
    if args.parents:
        missing = [f for f in folders.values() if not os.path.exists(os.path.join(f, "config.json"))]
        if missing:
            sys.exit(f"--parents: no model in {', '.join(missing)}")
    elif not all(os.path.exists(os.path.join(f, "model.safetensors.index.json")) for f in folders.values()):
        print(f"generating {args.size} family in {root} ...", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        write_family(root, SIZES[args.size], n_fine_tunes=3, shard_bytes=2_000_000_000)

    bindir = os.path.dirname(sys.executable)
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    rows = []
    for method in args.methods.split(","):
        L = SIZES[args.size].layers
        text = RECIPES[method].format(**folders, layers=L, quarter=L // 4, three_quarters=3 * L // 4)
        used = [f for n, f in folders.items() if f in text]
        recipe = os.path.join(root, f"{method}.yml")
        with open(recipe, "w") as f:
            f.write(text)
        nbytes = parent_bytes(used)
        result = {"method": method, "bytes": nbytes}
        tools = ("dmerge",) if args.skip_mergekit else ("dmerge", "mergekit")
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(args.repeat):
            for tool in tools:
                out = os.path.join(root, f"out-{tool}-{method}")
                shutil.rmtree(out, ignore_errors=True)
                warm(used)
                if tool == "dmerge":
                    cmd = [sys.executable, "-m", "dmerge.cli", "run", recipe, out, "--quiet", *args.dmerge_args.split()]
                else:
                    cmd = [os.path.join(bindir, "mergekit-yaml"), recipe, out]
                m = measure(cmd, env)
                runs[tool].append(m)
                print(f"{method:16s} {tool:9s} {m['wall']:8.1f} s  peak {m['peak_rss'] / 2**30:5.2f} GiB  "
                      f"{nbytes / m['wall'] / 1e9:5.2f} GB/s", file=sys.stderr)
                shutil.rmtree(out, ignore_errors=True)
        for tool, ms in runs.items():
            walls = sorted(m["wall"] for m in ms)
            result[tool] = {"wall": statistics.median(walls), "peak_rss": max(m["peak_rss"] for m in ms),
                            "walls": walls}
        rows.append(result)

    print(f"\nfamily: {args.size} ({SIZES[args.size]}), {os.cpu_count()} cores\n")
    print("| method | parent bytes | dmerge wall | dmerge peak RSS | dmerge GB/s | mergekit wall | mergekit peak RSS | mergekit GB/s | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, m = r["dmerge"], r.get("mergekit")
        cells = [r["method"], f"{r['bytes'] / 1e9:.2f} GB", f"{d['wall']:.1f} s", f"{d['peak_rss'] / 2**30:.2f} GiB",
                 f"{r['bytes'] / d['wall'] / 1e9:.2f}"]
        if m:
            cells += [f"{m['wall']:.1f} s", f"{m['peak_rss'] / 2**30:.2f} GiB", f"{r['bytes'] / m['wall'] / 1e9:.2f}",
                      f"{d['wall'] / m['wall']:.2f}x"]
        else:
            cells += ["-", "-", "-", "-"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
