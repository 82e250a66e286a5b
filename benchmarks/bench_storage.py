"""Merges from a bucket into a bucket, against the same merge on local files.

Starts moto's S3 server on 127.0.0.1 behind the tests' counting proxy
(``tests/s3stand.py``), uploads a generated family (base + 2 fine-tunes), then for each
method runs ``dmerge run`` local -> local and s3 -> s3 in one process each, and reports
wall time, the bytes the store sent against the parent tensor bytes, and the requests
made (ranged GETs, part uploads, everything else). Byte identity of the two outputs is
checked for every method.

    python benchmarks/bench_storage.py --size 400mb --methods linear,ties

The store is local, so the times measure dmerge's overhead per request and byte, not a
network: on real S3 the bytes ratio and request counts carry over, the times do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fsspec  # noqa: E402

from bench_merge import RECIPES, SIZES  # noqa: E402
from dmerge.io.model_source import open_model  # noqa: E402
from dmerge.toymodels import write_family  # noqa: E402
from s3stand import S3Stand  # noqa: E402


def tensor_bytes(folder: str) -> int:
    return sum(loc.entry.nbytes for loc in open_model(folder).tensors.values())


def store_read_rate(fs, prefixes: list[str]) -> float:
    """Bytes per second the store serves to plain s3fs ranged reads, 16 at a time: the
    floor under any merge's remote read time."""
    from concurrent.futures import ThreadPoolExecutor

    ranges = []
    for prefix in prefixes:
        for path in fs.ls(prefix, detail=False):
            if path.endswith(".safetensors"):
                size = fs.size(path)
                ranges += [(path, a, min(size, a + (64 << 20))) for a in range(0, size, 64 << 20)]
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        total = sum(pool.map(lambda r: len(fs.cat_file(r[0], start=r[1], end=r[2])), ranges))
    return total / (time.perf_counter() - start)


def run(recipe: str, out: str, options: str, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dmerge.cli", "run", recipe, out, "--quiet", "--overwrite",
                    "--storage-options", options, *extra], check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="400mb", choices=sorted(SIZES))
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--extra", default="", help="more `dmerge run` options, e.g. '--chunk-size 64M'")
    args = ap.parse_args()
    family = os.path.join(args.workdir, args.size)
    if not os.path.exists(os.path.join(family, "ft2")):
        write_family(family, SIZES[args.size], n_fine_tunes=3, shard_bytes=2_000_000_000)
    folders = {k: os.path.join(family, k) for k in ("base", "ft1", "ft2", "ft3")}
    stand = S3Stand()
    try:
        stand.boto().create_bucket(Bucket="models")
        stand.boto().create_bucket(Bucket="out")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **stand.options())
        t = time.perf_counter()
        for name in ("base", "ft1", "ft2", "ft3"):
            fs.put(folders[name], f"models/{name}", recursive=True)
        print(f"uploaded the family in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        urls = {k: f"s3://models/{k}" for k in folders}
        options = json.dumps({"s3": stand.options()})
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods.split(","):
                template = RECIPES[method]
                local_recipe, remote_recipe = os.path.join(tmp, "l.yml"), os.path.join(tmp, "r.yml")
                with open(local_recipe, "w") as f:
                    f.write(template.format(**folders))
                with open(remote_recipe, "w") as f:
                    f.write(template.format(**urls))
                local_out = os.path.join(tmp, f"out-{method}")
                extra = args.extra.split()
                local_s = run(local_recipe, local_out, options, extra)
                stand.reset_counts()
                remote_s = run(remote_recipe, f"s3://out/{method}", options, extra)
                served, requests = stand.bytes_sent, dict(stand.requests)
                parents = sum(tensor_bytes(folders[k]) for k in folders if "{" + k + "}" in template)
                same = all(fs.cat_file(f"out/{method}/{n}") == open(os.path.join(local_out, n), "rb").read()
                           for n in os.listdir(local_out) if n.endswith((".safetensors", ".json")))
                ranged = requests.get("GET range", 0)
                parts = requests.get("PUT part", 0)
                other = sum(requests.values()) - ranged - parts
                rows.append(f"| {method} | {local_s:.1f} | {remote_s:.1f} | {parents / 1e6:.0f} MB | "
                            f"{served / 1e6:.0f} MB ({served / parents:.2f}x) | {ranged} | {parts} | {other} | "
                            f"{'yes' if same else 'NO'} |")
                print(rows[-1], file=sys.stderr)
        rate = store_read_rate(fs, [f"models/{k}" for k in ("base", "ft1")])
        print(f"\n{args.size} family, load average {os.getloadavg()[0]:.1f}; the store alone serves ranged GETs "
              f"at {rate / 1e6:.0f} MB/s (16 threads, 64 MiB ranges)\n")
        print("| method | local -> local s | s3 -> s3 s | parent tensors | served by the store | ranged GETs "
              "| part uploads | other requests | identical |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        stand.stop()


if __name__ == "__main__":
    main()
