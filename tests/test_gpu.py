"""--cuda computes on the GPU and writes the same bytes as the CPU path.

CI has no GPU: these tests are skipped there (and `--cuda` itself falls back to the CPU
with a warning, which test_cuda_flag_falls_back_without_gpu covers everywhere).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import run_merge, shard_bytes, write_recipe
from dmerge.cli import main

RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
dtype: bfloat16
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [0.2, 0.9]}}
  - model: {ft2}
    parameters: {{weight: -0.4}}
dtype: bfloat16
""",
}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")


@needs_gpu
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gpu_output_equals_cpu_output(family, tmp_path, method):
    recipe = write_recipe(tmp_path / "r.yml", RECIPES[method].format(**family))
    run_merge(recipe, str(tmp_path / "cpu"), "--chunk-size", "16K")
    run_merge(recipe, str(tmp_path / "gpu"), "--cuda", "--chunk-size", "16K")
    assert shard_bytes(str(tmp_path / "cpu")) == shard_bytes(str(tmp_path / "gpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on machines without a GPU")
def test_cuda_flag_falls_back_without_gpu(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", RECIPES["linear"].format(**family))
    result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "out"), "--cuda"])
    assert result.exit_code == 0, result.output
    assert "no GPU is available; computing on CPU" in result.output
