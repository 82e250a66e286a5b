"""Shared fixtures: tiny Llama-shaped families written on the fly (no downloads)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from dmerge.toymodels import LlamaShape, write_family

warnings.filterwarnings("ignore", category=DeprecationWarning)

TINY = LlamaShape(hidden=64, layers=4, intermediate=96, heads=4, kv_heads=2, vocab=128)

# A ties recipe over the `family` fixture (base + two fine-tunes), statistics and all.
TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.6}}
dtype: bfloat16
"""


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, str]:
    """base + ft1 + ft2 + ft3, bf16, the fine-tunes written as 3 shards each."""
    root = tmp_path_factory.mktemp("family")
    folders = write_family(str(root), TINY, n_fine_tunes=3, shard_bytes=60_000)
    return dict(zip(["base", "ft1", "ft2", "ft3"], folders))


def load_folder(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or shards)."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for s in shards:
        out.update(load_file(os.path.join(folder, s)))
    return out


def shard_bytes(folder: str) -> dict[str, bytes]:
    """Raw bytes of every safetensors file in a folder (for byte-identity checks)."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")}


def write_recipe(path, text: str) -> str:
    path = str(path)
    with open(path, "w") as f:
        f.write(text)
    return path


def run_merge(recipe_path: str, out_dir: str, *extra: str) -> None:
    """Run `dmerge run` in-process through the CLI (click's test runner)."""
    from click.testing import CliRunner

    from dmerge.cli import main

    result = CliRunner().invoke(main, ["run", recipe_path, out_dir, "--quiet", *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (float64)."""
    x = x.double().abs()
    exp = torch.floor(torch.log2(torch.where(x > 0, x, torch.full_like(x, 2.0**-126))))
    exp = torch.clamp(exp, min=-126)
    return torch.pow(2.0, exp - 7)


def compare_with_mergekit(ours: dict, theirs: dict, reference=None, max_off_fraction: float = 1e-3) -> int:
    """Assert dmerge's output agrees with mergekit's within one bf16 step per element.

    Elements further apart are allowed only where dmerge is the one that is right:
    within half an ulp (plus float64 slack) of ``reference(name)`` (float64 tensor), which
    is then mergekit's own float32 arithmetic being off. Returns how many such elements.
    """
    assert ours.keys() == theirs.keys(), set(ours) ^ set(theirs)
    off = total = 0
    for name in ours:
        a, b = ours[name].double(), theirs[name].double()
        assert ours[name].dtype == theirs[name].dtype, name
        far = (a - b).abs() > bf16_ulp(torch.maximum(a.abs(), b.abs())) * 1.0001
        total += a.numel()
        if bool(far.any()):
            assert reference is not None, f"{name}: {int(far.sum())} elements differ by more than one bf16 step"
            r = reference(name)[far]
            err = (a[far] - r).abs()
            slack = 0.5 * bf16_ulp(a[far]) + 1e-12 * r.abs().clamp(min=1e-30) + 1e-15
            assert bool((err <= slack).all()), f"{name}: dmerge differs from mergekit and from the float64 reference"
            off += int(far.sum())
    assert off <= max_off_fraction * total, f"{off} of {total} elements differ from mergekit"
    return off


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_cluster(n_workers: int = 2, nthreads: int = 1, memory_limit: str = "1GB", worker_args: tuple = (),
                 pythonpath: tuple = ()):
    """A real `dask scheduler` and `dask worker` processes on 127.0.0.1, stopped after.
    Yields (address, the worker command's process)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    paths = [*pythonpath, os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers",
                                   str(n_workers), "--nthreads", str(nthreads), "--no-dashboard", "--memory-limit",
                                   memory_limit, *worker_args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from distributed import Client

        deadline = time.time() + 60
        while True:
            try:
                with Client(address, timeout="5s") as c:
                    if len(c.scheduler_info()["workers"]) >= n_workers:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("dask cluster did not start")
            time.sleep(0.5)
        yield address, procs[1]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


# A module registering ``slowfile://``: local files whose ranged reads of tensor data are
# slowed down by $SLOWFS_DELAY seconds (a slow object store), so that a merge is still
# running when a test stops it. Tests write it as ``slowfs.py`` and import or preload it.
SLOW_FS = '''
import os
import time
import fsspec
from fsspec.implementations.local import LocalFileSystem


class SlowLocal(LocalFileSystem):
    protocol = "slowfile"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("slowfile://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        if start is not None and start > 4096:
            time.sleep(float(os.environ.get("SLOWFS_DELAY", "0.05")))
        return super().cat_file(path, start=start, end=end, **kwargs)


fsspec.register_implementation("slowfile", SlowLocal, clobber=True)
'''
