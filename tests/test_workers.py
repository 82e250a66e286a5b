"""Real worker processes: torch threads, memory limits, a worker killed mid-merge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from conftest import SLOW_FS, TIES as RECIPE, dask_cluster, run_merge, shard_bytes, write_recipe
from dmerge.cli import main



def test_torch_threads_follow_the_host_share():
    from dmerge.worker_env import host_task_threads, torch_threads_for

    workers = {"a": {"host": "h1", "nthreads": 2}, "b": {"host": "h1", "nthreads": 2}, "c": {"host": "h2", "nthreads": 1}}
    assert host_task_threads(workers) == {"h1": 4, "h2": 1}
    assert torch_threads_for(4, cores=16) == 4 and torch_threads_for(4, cores=2) == 1 and torch_threads_for(1, 8) == 8


def test_nanny_worker_gets_its_share_of_cores_not_omp_1():
    """The nanny starts workers with OMP_NUM_THREADS=1 (torch then uses one thread); the
    plugin a merge registers gives a worker its host's share of the cores."""
    from distributed import Client

    from dmerge.execute import ClusterOptions, dask_client
    from dmerge.worker_env import usable_cores

    with dask_cluster(n_workers=1, nthreads=1) as (address, _):
        with Client(address) as c:
            before = set(c.run(lambda: __import__("torch").get_num_threads()).values())
        with dask_client(ClusterOptions(scheduler=address), quiet=True) as client:
            after = set(client.run(lambda: __import__("torch").get_num_threads()).values())
    assert before == {1}
    assert after == {usable_cores()}


def test_chunk_budget_follows_the_smallest_worker():
    from dmerge.execute import WorkerMemory, chunk_budget

    big = 128 << 20
    assert chunk_budget([WorkerMemory(None, 4), WorkerMemory(64 << 30, 2)], big) == big
    small = WorkerMemory(1 << 30, 4)
    assert chunk_budget([WorkerMemory(64 << 30, 2), small], big) == int(small.per_task()) < big
    assert small.limit_for(int(small.per_task())) in range((1 << 30) - 8, (1 << 30) + 8)


def test_hopeless_memory_limit_is_refused_up_front(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    start = time.time()
    result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "-q", "--memory-limit", "300MB"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "memory limit" in line and "too small" in line and "at least" in line, line
    assert time.time() - start < 10 and not os.path.exists(tmp_path / "out")


def test_small_memory_limit_plans_smaller_chunks(family, tmp_path):
    """Without --chunk-size, the budget follows the workers' limit; the bytes do not change."""
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    run_merge(recipe, str(tmp_path / "big"))
    result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "small"), "--memory-limit", "500.1M",
                                       "--processes", "--threads-per-worker", "1"])
    assert result.exit_code == 0, result.output
    plan = CliRunner().invoke(main, ["plan", recipe])
    default_tasks = int(next(ln for ln in plan.stdout.splitlines() if ln.startswith("tasks:")).split()[1])
    tasks = int(result.stdout.rsplit(", ", 1)[1].split()[0])
    assert tasks > default_tasks  # about 60 KiB per task: the MLP matrices are split
    assert shard_bytes(str(tmp_path / "big")) == shard_bytes(str(tmp_path / "small"))




def test_worker_killed_mid_merge_same_bytes(family, tmp_path):
    """SIGKILL one of two worker processes while it merges: its tasks run elsewhere (or
    on its replacement) and the output is byte-identical to an undisturbed run."""
    from distributed import Client

    (tmp_path / "slowfs.py").write_text(SLOW_FS)
    sys.path.insert(0, str(tmp_path))
    try:
        import slowfs  # noqa: F401 -- registers slowfile:// in this process too
    finally:
        sys.path.remove(str(tmp_path))
    run_merge(write_recipe(tmp_path / "local.yml", RECIPE.format(**family)), str(tmp_path / "local"),
              "--chunk-size", "16K")
    slow = {k: f"slowfile://{v}" for k, v in family.items()}
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**slow))
    with dask_cluster(n_workers=2, nthreads=1, worker_args=("--preload", "slowfs"),
                      pythonpath=(str(tmp_path),)) as (address, _):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path)] + sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", "import slowfs; from dmerge.cli import main; main()", "run",
                                 recipe, str(tmp_path / "out"), "--scheduler", address, "--chunk-size", "16K"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with Client(address) as client:
            deadline = time.time() + 60
            while not any(client.processing().values()):  # wait until the workers are merging
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            time.sleep(1.0)
            victim = next(a for a, keys in client.processing().items() if keys)
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert shard_bytes(str(tmp_path / "local")) == shard_bytes(str(tmp_path / "out"))
    assert " rerun (" in out, out  # the summary counts the tasks the killed worker held


def test_freed_memory_goes_back_when_asked():
    """The allocator keeps freed blocks for reuse (fast), and gives them back on request."""
    code = """
import torch
from dmerge.allocator import keep_freed_memory, release_freed_memory, resident_bytes
keep_freed_memory()
base = resident_bytes()
keep = []
for i in range(400):
    t = torch.ones(1 << 20)  # 4 MiB each, below the raised mmap threshold: from the heap
    keep.append(t)
keep = [t for i, t in enumerate(keep) if i == len(keep) - 1]  # free all but the top one
held = resident_bytes() - base
release_freed_memory()
print(held >> 20, (resident_bytes() - base) >> 20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"})
    held, after = map(int, out.stdout.split())
    assert held > 1000 and after < held / 4, out.stdout


def test_memory_goes_back_past_half_the_limit(monkeypatch):
    import dmerge.allocator as allocator

    trims = []
    monkeypatch.setattr(allocator, "release_freed_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr(allocator, "resident_bytes", lambda: 600 << 20)
    assert not allocator.release_if_above(None) and not allocator.release_if_above(2 << 30)
    assert allocator.release_if_above(1 << 30) and trims == [1]


def test_malloc_tuning_can_be_turned_off(monkeypatch):
    import dmerge.allocator as allocator

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append(option)
            return 1

    monkeypatch.setattr(allocator, "_libc", FakeLibc())
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("DMERGE_MALLOC_TUNING", "0")
    assert not allocator.keep_freed_memory() and calls == []
    monkeypatch.delenv("DMERGE_MALLOC_TUNING")
    assert allocator.keep_freed_memory()
    assert calls == [allocator._M_MMAP_THRESHOLD, allocator._M_TRIM_THRESHOLD]


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    assert threading.active_count() < 50


def test_cuda_on_a_cluster_without_gpus_warns_once_and_computes_on_cpu(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    run_merge(recipe, str(tmp_path / "local"))
    with dask_cluster(n_workers=1, nthreads=2) as (address, _):
        result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "-q", "--cuda", "--scheduler",
                                           address])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "workers" in warnings[0], result.stderr
    assert shard_bytes(str(tmp_path / "local")) == shard_bytes(str(tmp_path / "out"))


def test_a_cuda_task_on_a_worker_without_gpu_computes_on_cpu(family, tmp_path, monkeypatch):
    """A plan made for GPUs whose task lands on a CPU-only worker gives the same bytes."""
    import dmerge.tasks as tasks
    from dmerge.execute import run_plan
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    monkeypatch.setattr(tasks.torch.cuda, "is_available", lambda: False)
    recipe = load_recipe(RECIPE.format(**family), is_text=True)
    run_plan(build_plan(recipe, chunk_bytes=16 << 10), str(tmp_path / "cpu"), quiet=True)
    run_plan(build_plan(recipe, chunk_bytes=16 << 10, device="cuda"), str(tmp_path / "cuda"), quiet=True)
    assert shard_bytes(str(tmp_path / "cpu")) == shard_bytes(str(tmp_path / "cuda"))


def test_scheduler_without_workers_is_a_clear_error(family, tmp_path, monkeypatch):
    import dmerge.execute as execute
    from distributed import LocalCluster

    monkeypatch.setattr(execute, "WAIT_FOR_WORKERS_S", 2)
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None) as c:
        result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "-q", "--scheduler",
                                           c.scheduler_address])
    assert result.exit_code == 1 and "no worker joined the scheduler" in result.stderr, result.output
    assert not os.path.exists(tmp_path / "out")


def test_arithmetic_goes_to_workers_that_declare_a_gpu(family, tmp_path):
    """--cuda on a cluster where one worker declares `--resources GPU=1`: every
    arithmetic task runs there (on its CPU here: the bytes are the same), byte copies
    anywhere."""
    from distributed import Client

    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    text = f"""
merge_method: task_arithmetic
base_model: {family['base']}
slices:
  - sources:
      - model: {family['base']}
        layer_range: [0, 2]
      - model: {family['ft1']}
        layer_range: [0, 2]
        parameters: {{weight: 0.5}}
  - sources:
      - model: {family['ft2']}
        layer_range: [2, 4]
dtype: bfloat16
"""
    recipe = write_recipe(tmp_path / "r.yml", text)
    plan = build_plan(load_recipe(recipe))
    copies = {ti for ti, t in enumerate(plan.tensors) if t.copy_bytes}
    assert copies and len(copies) < len(plan.tensors)
    run_merge(recipe, str(tmp_path / "local"))
    with dask_cluster(n_workers=1, nthreads=1) as (address, _):
        gpu = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                "--no-dashboard", "--resources", "GPU=1", "--memory-limit", "1GB"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(address) as client:
                client.wait_for_workers(2, timeout=60)
                result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "-q", "--cuda",
                                                   "--scheduler", address])
                assert result.exit_code == 0, result.output

                def executed(dask_worker):
                    return [e[0] for e in dask_worker.state.log if len(e) > 2 and e[2] == "executing"
                            and isinstance(e[0], tuple) and str(e[0][0]).startswith("dmerge-write")]

                ran = client.run(executed)
                gpu_address = next(a for a, w in client.scheduler_info()["workers"].items()
                                   if w.get("resources", {}).get("GPU"))
        finally:
            gpu.terminate()
            gpu.wait(timeout=30)
    on_cpu_worker = [k for a, keys in ran.items() if a != gpu_address for k in keys]
    assert ran[gpu_address] and all(k[1] in copies for k in on_cpu_worker), on_cpu_worker
    assert shard_bytes(str(tmp_path / "local")) == shard_bytes(str(tmp_path / "out"))


def test_hopeless_limit_of_real_workers_is_refused_within_seconds(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    with dask_cluster(n_workers=1, nthreads=2, memory_limit="350MB") as (address, _):
        start = time.time()
        result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "-q", "--scheduler", address])
        elapsed = time.time() - start
    assert result.exit_code == 1 and "too small" in result.stderr and "at least" in result.stderr, result.output
    assert elapsed < 10 and not os.path.exists(tmp_path / "out")
