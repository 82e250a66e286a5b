"""The plan is built from headers alone, is printable, and scales to 405B-shaped parents."""

from __future__ import annotations

import math
import os
import tracemalloc

from click.testing import CliRunner

from conftest import TINY, write_recipe
from dmerge.cli import main
from dmerge.plan import build_plan
from dmerge.recipe import load_recipe
from dmerge.toymodels import LLAMA_405B, write_sparse_model


def test_plan_cli_prints_totals(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 0.5}}
  - model: {family['ft2']}
    parameters: {{weight: 0.5}}
""")
    result = CliRunner().invoke(main, ["plan", recipe, "--chunk-size", "8K", "--out-shard-size", "100K", "--tensors"])
    assert result.exit_code == 0, result.output
    out = result.output
    n_tensors = len(TINY.tensor_shapes())
    assert f"output tensors:    {n_tensors}" in out
    assert "model-00001-of-" in out and "peak memory/task" in out
    assert not os.path.exists(tmp_path / "out")


def test_chunks_cover_rows_and_respect_budget(family, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 0.5}}
  - model: {family['ft2']}
    parameters: {{weight: 0.5}}
"""))
    plan = build_plan(recipe, chunk_bytes=8 << 10, shard_bytes=100_000)
    for t in plan.tensors:
        spans = [t.chunk_rows(i) for i in range(t.n_chunks)]
        assert spans[0][0] == 0 and spans[-1][1] == t.rows
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if len(t.shape) == 2 and t.rows_per_chunk > 1:
            assert t.task_bytes <= 8 << 10
    # shards are contiguous, non-overlapping, in plan order
    for s in plan.shards:
        pos = len(s.header)
        for i in s.tensors:
            assert plan.tensors[i].offset == pos
            pos += plan.tensors[i].nbytes
        assert pos == s.size


def test_plan_for_three_405b_parents(tmp_path):
    """Three Llama-3.1-405B-shaped parents (810 GB each, sparse files): headers only."""
    parents = [write_sparse_model(str(tmp_path / f"p{i}"), LLAMA_405B) for i in range(3)]
    used = sum(os.stat(os.path.join(p, f)).st_blocks * 512 for p in parents for f in os.listdir(p))
    assert used < 200 << 20  # the hole takes no disk
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", f"""
merge_method: task_arithmetic
base_model: {parents[0]}
models:
  - model: {parents[1]}
    parameters: {{weight: 0.5}}
  - model: {parents[2]}
    parameters: {{weight: 0.5}}
dtype: bfloat16
"""))
    tracemalloc.start()
    plan = build_plan(recipe, chunk_bytes=256 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shapes = LLAMA_405B.tensor_shapes()
    params = sum(math.prod(s) for s in shapes.values())
    assert 400e9 < params < 410e9
    assert len(plan.tensors) == len(shapes) == 126 * 9 + 3
    assert plan.bytes_read == 3 * 2 * params
    assert plan.bytes_written == sum(s.size for s in plan.shards) > 2 * params
    assert plan.peak_task_bytes <= 256 << 20
    assert plan.n_tasks > 3000
    assert peak < 200 << 20, f"planning used {peak / 2**20:.0f} MiB"
    # greedy packing under 5 GB, as transformers does: Llama-3.1-405B ships 191 shards
    assert len(plan.shards) == 191
    assert all(s.size <= 5e9 or len(s.tensors) == 1 for s in plan.shards)
    assert "output shards:     191" in plan.summary()
