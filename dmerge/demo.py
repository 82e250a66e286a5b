"""``dmerge demo``: a real merge on models built locally, no network needed."""

from __future__ import annotations

import contextlib
import os

import click
import torch
from safetensors.torch import load_file

from dmerge.toymodels import LlamaShape, write_family

RECIPE = """\
# Task arithmetic: add both fine-tunes' task vectors to the base.
merge_method: task_arithmetic
base_model: base
models:
  - model: ft1
    parameters:
      weight: 0.7
  - model: ft2
    parameters:
      weight: [0.3, 0.6]   # a gradient over layer depth
dtype: bfloat16
"""


def run_demo(workdir: str, quiet: bool = False) -> None:
    from dmerge.execute import ClusterOptions, describe_result, run_plan
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    os.makedirs(workdir, exist_ok=True)
    shape = LlamaShape(hidden=128, layers=4, intermediate=256, heads=4, kv_heads=2, vocab=512)
    base, ft1, ft2 = write_family(workdir, shape, n_fine_tunes=2, shard_bytes=200_000)
    recipe_path = os.path.join(workdir, "recipe.yml")
    with open(recipe_path, "w") as f:
        f.write(RECIPE)
    click.echo(f"built base + 2 fine-tunes in {workdir}; recipe: {recipe_path}")
    plan = build_plan(load_recipe(recipe_path), chunk_bytes=64 << 10)
    out = os.path.join(workdir, "merged")
    result = run_plan(plan, out, cluster=ClusterOptions(workers=2, threads_per_worker=1), quiet=quiet)
    click.echo(describe_result(result))

    # Check one tensor against the formula, and that transformers loads the model.
    name = "model.layers.3.mlp.up_proj.weight"
    merged = _load_tensor(out, name).double()
    b, a1, a2 = (_load_tensor(p, name).double() for p in (base, ft1, ft2))
    expected = b + 0.7 * (a1 - b) + 0.6 * (a2 - b)
    err = (merged - expected).abs().max().item()
    click.echo(f"check {name}: max |merged - formula| = {err:.2e} (bf16 rounding only)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        click.echo("transformers not installed: skipping the load check")
        return
    with _quiet_transformers() if quiet else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    finite = bool(torch.isfinite(logits).all())
    click.echo(f"transformers loads {out}: {type(model).__name__}, {model.config.num_hidden_layers} layers, logits finite: {finite}")
    if not finite or err > 0.01:
        raise SystemExit("demo check failed")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' and huggingface_hub's progress bars and messages (the
    "Loading weights" bar), and restore their settings afterwards."""
    from transformers.utils import logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    bars_were_on = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    hub = None
    try:
        from huggingface_hub import utils as hub

        hub_bars_were_off = hub.are_progress_bars_disabled()
        hub.disable_progress_bars()
    except (ImportError, AttributeError):
        hub = None
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars_were_on:
            tf_logging.enable_progress_bar()
        if hub is not None and not hub_bars_were_off:
            hub.enable_progress_bars()


def _load_tensor(folder: str, name: str) -> torch.Tensor:
    import json

    idx = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)[name]
    with open(idx) as f:
        shard = json.load(f)["weight_map"][name]
    return load_file(os.path.join(folder, shard))[name]
