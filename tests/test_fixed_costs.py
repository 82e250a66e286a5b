"""Fixed costs: the commands that only read headers never import torch or distributed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import TIES, write_recipe
from dmerge.io.safetensors_format import FLOAT_CODES, ITEMSIZE, TORCH_DTYPE_NAMES, promote_codes

HEAVY = ("torch", "distributed")

# Runs the CLI in a fresh interpreter and reports which heavy modules it ended up with.
_PROBE = textwrap.dedent("""
    import sys
    from dmerge.cli import main
    sys.argv = ["dmerge"] + sys.argv[1:]
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules))
    print("EXIT", code)
""").format(heavy=HEAVY)


def _probe(*args: str) -> tuple[list[str], str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = done.stdout.splitlines()
    loaded = next(line for line in lines if line.startswith("LOADED"))
    exit_line = next(line for line in lines if line.startswith("EXIT"))
    assert exit_line == "EXIT 0", done.stdout + done.stderr
    return eval(loaded.split(" ", 1)[1]), done.stdout  # a list literal this probe printed


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["plan", "--help"], ["methods"]])
def test_help_imports_neither_torch_nor_distributed(args):
    loaded, out = _probe(*args)
    assert loaded == [], f"dmerge {' '.join(args)} imported {loaded}"
    assert "Usage" in out or "linear" in out


def test_plan_imports_neither_torch_nor_distributed(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**family))
    loaded, out = _probe("plan", recipe, "--tensors")
    assert loaded == [], f"dmerge plan imported {loaded}"
    assert "output tensors" in out and "model.layers.0.mlp.up_proj.weight" in out


def test_itemsizes_and_promotion_match_torch():
    """The torch-free dtype tables planning uses say what torch says."""
    codes = list(ITEMSIZE)
    for code in codes:
        dtype = getattr(torch, TORCH_DTYPE_NAMES[code])
        assert torch.empty((), dtype=dtype).element_size() == ITEMSIZE[code], code
    for a in sorted(FLOAT_CODES):
        for b in codes:
            try:
                want = torch.promote_types(getattr(torch, TORCH_DTYPE_NAMES[a]), getattr(torch, TORCH_DTYPE_NAMES[b]))
            except RuntimeError:
                want = None
            got = promote_codes(a, b)
            assert (got and getattr(torch, TORCH_DTYPE_NAMES[got])) == want, (a, b, got, want)
