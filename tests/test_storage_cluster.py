"""Parents behind fsspec URLs are read by byte range; an external Dask cluster works."""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from conftest import TIES, dask_cluster, run_merge, shard_bytes, write_recipe


class CountingMemoryFS(MemoryFileSystem):
    """An in-memory fsspec filesystem that counts the bytes handed out."""

    protocol = "countmem"
    bytes_served = 0
    whole_file_reads: list[str] = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("countmem://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        if start is None and end is None and path.endswith(".safetensors"):
            type(self).whole_file_reads.append(path)
        type(self).bytes_served += len(data)
        return data


fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)


def _upload(folder: str, url_root: str) -> str:
    fs = fsspec.filesystem("countmem")
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            fs.pipe_file(f"{url_root}/{name}", f.read())
    return f"countmem://{url_root}"


RECIPE = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: -0.2}}
dtype: bfloat16
"""


def test_fsspec_parents_read_by_range(family, tmp_path):
    urls = {k: _upload(family[k], f"/bucket/{k}") for k in ("base", "ft1", "ft2")}
    run_merge(write_recipe(tmp_path / "local.yml", RECIPE.format(**family)), str(tmp_path / "local"))
    CountingMemoryFS.bytes_served = 0
    CountingMemoryFS.whole_file_reads.clear()
    run_merge(write_recipe(tmp_path / "remote.yml", RECIPE.format(**urls)), str(tmp_path / "remote"), "--chunk-size", "16K")
    assert shard_bytes(str(tmp_path / "local")) == shard_bytes(str(tmp_path / "remote"))
    assert CountingMemoryFS.whole_file_reads == []
    tensor_bytes = sum(os.path.getsize(os.path.join(family[k], f)) for k in ("base", "ft1", "ft2")
                       for f in os.listdir(family[k]) if f.endswith(".safetensors"))
    # every parent byte once, plus headers/config/index: nothing read twice
    assert tensor_bytes <= CountingMemoryFS.bytes_served < tensor_bytes * 1.05


@pytest.fixture
def external_cluster():
    """A `dask scheduler` and a `dask worker` (2 processes) on 127.0.0.1, stopped after."""
    with dask_cluster(n_workers=2, nthreads=1, memory_limit="1GB") as (address, _):
        yield address


def test_external_scheduler_same_bytes(family, tmp_path, external_cluster):
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    run_merge(recipe, str(tmp_path / "local"), "--out-shard-size", "100K")
    run_merge(recipe, str(tmp_path / "cluster"), "--out-shard-size", "100K", "--scheduler", external_cluster,
              "--chunk-size", "8K")
    assert shard_bytes(str(tmp_path / "local")) == shard_bytes(str(tmp_path / "cluster"))




class RangeLog(MemoryFileSystem):
    """Memory filesystem logging every ranged read of a safetensors file (path, start, end)."""

    protocol = "rangelog"
    reads: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("rangelog://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        if path.endswith(".safetensors"):
            type(self).reads.append((path, start, len(data)))
        return data


fsspec.register_implementation("rangelog", RangeLog, clobber=True)


def test_bytes_read_is_what_the_store_served(family, tmp_path):
    """ties reads its chunks for the statistics too, from the store once and then from the
    spill: the plan's estimate bounds it, and the run reports exactly the tensor bytes the
    store handed out (headers aside)."""
    from dmerge.execute import run_plan
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    fs = fsspec.filesystem("rangelog")
    urls = {}
    for k in ("base", "ft1", "ft2"):
        for name in os.listdir(family[k]):
            with open(os.path.join(family[k], name), "rb") as f:
                fs.pipe_file(f"/b/{k}/{name}", f.read())
        urls[k] = f"rangelog:///b/{k}"
    plan = build_plan(load_recipe(write_recipe(tmp_path / "r.yml", TIES.format(**urls))), chunk_bytes=16 << 10)
    assert max(t.n_chunks for t in plan.tensors) > 1
    RangeLog.reads.clear()
    result = run_plan(plan, str(tmp_path / "out"), quiet=True)
    data_begin = {}
    for path in {p for p, _, _ in RangeLog.reads}:
        raw = fs.cat_file(path)
        data_begin[path] = 8 + int.from_bytes(raw[:8], "little")
    served = sum(n for p, start, n in RangeLog.reads if start is not None and start >= data_begin[p])
    certain, at_most = plan.reads
    assert result.bytes_read == served
    assert plan.parent_bytes <= certain <= served <= at_most
    assert served == plan.parent_bytes  # each byte once: the later passes read the spill
    assert result.n_tasks == plan.n_tasks


def test_keys_are_run_scoped_and_stable(family, tmp_path):
    from dmerge.execute import run_id
    from dmerge.graph import build_graph
    from dmerge.io.sinks import LocalShard
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    def keys(text, out):
        plan = build_plan(load_recipe(text, is_text=True), chunk_bytes=16 << 10)
        dsk, _ = build_graph(plan, [LocalShard("shard")] * len(plan.shards), run_id(plan, out))
        assert len(dsk) == plan.n_tasks
        return set(dsk)

    a = keys(TIES.format(**family), "out-a")
    assert keys(TIES.format(**family), "out-a") == a  # a resumed run recognises its own work
    assert not a & keys(TIES.format(**family), "out-b")
    assert not a & keys(TIES.format(**family).replace("0.7", "0.6"), "out-a")

    # an output URL names the same place from any working folder
    plan = build_plan(load_recipe(TIES.format(**family), is_text=True))
    here = run_id(plan, "s3://bucket/out")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run_id(plan, "s3://bucket/out") == here
    finally:
        os.chdir(previous)


def test_two_merges_at_once_on_one_scheduler(family, tmp_path):
    """Two different merges (two `dmerge run` processes) started together on one
    scheduler: each gets its own bytes (with shared keys, the second used the first's
    results and wrote zeros)."""
    from distributed import LocalCluster

    recipes = {"ties": TIES.format(**family), "ta": RECIPE.format(**family)}
    paths = {name: write_recipe(tmp_path / f"{name}.yml", text) for name, text in recipes.items()}
    for name, path in paths.items():
        run_merge(path, str(tmp_path / f"{name}-alone"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        procs = [subprocess.Popen([sys.executable, "-m", "dmerge.cli", "run", path, str(tmp_path / f"{name}-shared"),
                                   "--scheduler", cluster.scheduler_address, "--chunk-size", "8K", "-q"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, path in paths.items()]
        results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    for name in paths:
        assert shard_bytes(str(tmp_path / f"{name}-alone")) == shard_bytes(str(tmp_path / f"{name}-shared")), name


def test_graph_submitted_in_waves_gives_the_same_bytes(family, tmp_path, monkeypatch):
    """Waves of whole tensors: each closed under its dependencies, together the graph."""
    import dmerge.execute as execute
    from dmerge.graph import build_graph, waves
    from dmerge.io.sinks import LocalShard
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    plan = build_plan(load_recipe(TIES.format(**family), is_text=True), chunk_bytes=8 << 10)
    dsk, keys = build_graph(plan, [LocalShard("shard")] * len(plan.shards), "r")
    parts = waves(dsk, keys, 20)
    assert len(parts) > 5
    merged = {}
    for part, outs, _ in parts:
        merged.update(part)
        for task in part.values():  # every key a task names is in its own wave
            deps = [a for a in task[1:] if isinstance(a, tuple) and a in dsk]
            deps += [k for a in task[1:] if isinstance(a, list) for k in a if isinstance(k, tuple) and k in dsk]
            assert all(d in part for d in deps)
        assert set(outs) <= set(part)
    assert merged == dsk and [k for _, outs, _ in parts for k in outs] == keys

    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
    run_merge(recipe, str(tmp_path / "whole"), "--chunk-size", "8K")
    monkeypatch.setattr(execute, "TASKS_PER_WAVE", 20)
    run_merge(recipe, str(tmp_path / "waves"), "--chunk-size", "8K")
    assert shard_bytes(str(tmp_path / "whole")) == shard_bytes(str(tmp_path / "waves"))
