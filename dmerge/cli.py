"""Command line: ``dmerge run|plan|demo|methods`` and the ``dmerge-yaml`` alias.

``dmerge-yaml RECIPE OUT_DIR`` takes mergekit-yaml's argument order and its common
flags (``--cuda``, ``--copy-tokenizer``, ``--allow-crimes``, ``--out-shard-size``,
``--lazy-unpickle``), so existing scripts keep working.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
import warnings

import click

from dmerge.errors import DMergeError, install_warning_format
from dmerge.units import parse_size


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = _Size()


def _merge_options(fn):
    options = [
        click.option("--out-shard-size", type=SIZE, default="5B", show_default=True,
                     help="Maximum bytes per output shard (5B = five billion bytes, as mergekit)."),
        click.option("--chunk-size", type=SIZE, default="128M", show_default=True,
                     help="Per-task memory budget; tensors larger than this are split by rows."),
        click.option("--cuda/--no-cuda", default=False, help="Compute on the GPU (falls back to CPU if none)."),
        click.option("--compute-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
                     help="Arithmetic precision; the result is rounded once to the output dtype."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
                     help="Copy the base (or first) model's tokenizer files when the recipe builds no tokenizer."),
        click.option("--allow-crimes", is_flag=True, help="Allow mixing architectures."),
        click.option("--allow-nan", is_flag=True, help="Write NaN/Inf produced by a merge instead of failing."),
        click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of random methods (DARE, DELLA)."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True),
        click.option("--scheduler", metavar="tcp://HOST:PORT", default=None, help="Use an existing Dask cluster."),
        click.option("--workers", type=click.IntRange(min=1), default=None, help="Workers of the local cluster (default 1)."),
        click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
                     help="Threads per local worker (default: all cores)."),
        click.option("--memory-limit", default="auto", show_default=True, help="Memory limit per local worker, e.g. 2GB."),
        click.option("--processes", is_flag=True, help="Run local workers as separate processes instead of threads."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or cluster messages."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the model in an OUT_DIR that already holds one (once the new merge is complete)."),
        click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1)."),
        click.option("--lazy-unpickle", is_flag=True, hidden=True, help="Accepted for mergekit compatibility."),
        click.option("--trust-remote-code", is_flag=True, hidden=True, help="Accepted for mergekit compatibility."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, SLURM, Kubernetes, systemd): handled like Ctrl-C, so a merge
    stops promptly and removes what it wrote."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _debugging(debug: bool = False) -> bool:
    return debug or os.environ.get("DMERGE_DEBUG", "") not in ("", "0")


def _friendly_errors(fn):
    """Every failure is one line on stderr and exit status 1 (the traceback with --debug
    or DMERGE_DEBUG=1); Ctrl-C and SIGTERM exit 130 and 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = _debugging(kwargs.pop("debug", False))
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if debug:
                traceback.print_exc()
            if isinstance(e, DMergeError):
                message = str(e).strip().replace("\n", " ")
                if e.__cause__ is not None and not isinstance(e.__cause__, DMergeError) and not debug:
                    message += " (run with --debug or DMERGE_DEBUG=1 for the traceback)"
            else:
                from dmerge.execute import one_line

                message = f"{one_line(e)} (run with --debug or DMERGE_DEBUG=1 for the traceback)"
            click.echo(f"error: {message}", err=True)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _do_run(recipe_path: str, out_dir: str, **o) -> None:
    install_warning_format()
    from dmerge.execute import ClusterOptions, describe_result, run_plan
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    with warnings.catch_warnings():
        if o["quiet"]:
            warnings.simplefilter("ignore")
        recipe = load_recipe(recipe_path, allow_crimes=o["allow_crimes"])
    device = "cpu"
    if o["cuda"]:
        import torch

        if torch.cuda.is_available():
            device = "cuda"
        else:
            click.echo("warning: --cuda given but no GPU is available; computing on CPU", err=True)
    plan = build_plan(
        recipe,
        chunk_bytes=o["chunk_size"],
        shard_bytes=o["out_shard_size"],
        compute_dtype=o["compute_dtype"],
        seed=o["random_seed"],
        allow_nan=o["allow_nan"],
        device=device,
    )
    cluster = ClusterOptions(
        scheduler=o["scheduler"],
        workers=o["workers"],
        threads_per_worker=o["threads_per_worker"],
        memory_limit=o["memory_limit"],
        processes=o["processes"],
    )
    result = run_plan(plan, out_dir, cluster=cluster, quiet=o["quiet"], copy_tokenizer=o["copy_tokenizer"],
                      write_model_card=o["write_model_card"], overwrite=o["overwrite"])
    if not o["quiet"]:
        click.echo(describe_result(result))  # stdout, for scripts; progress and logs stay on stderr


@click.group()
@click.version_option(package_name="dmerge")
def main() -> None:
    """dmerge: distributed, sharded merges of large language models (mergekit recipes)."""


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@_merge_options
@_friendly_errors
def run_cmd(recipe: str, out_dir: str, **options) -> None:
    """Merge the models of RECIPE (mergekit YAML) into OUT_DIR."""
    _do_run(recipe, out_dir, **options)


@click.command("dmerge-yaml")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@_merge_options
@_friendly_errors
def mergekit_yaml(config_file: str, out_path: str, **options) -> None:
    """mergekit-yaml compatible entry point: dmerge-yaml CONFIG_FILE OUT_PATH."""
    _do_run(config_file, out_path, **options)


@main.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out-shard-size", type=SIZE, default="5B", show_default=True)
@click.option("--chunk-size", type=SIZE, default="128M", show_default=True)
@click.option("--compute-dtype", type=click.Choice(["float64", "float32"]), default="float64")
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every output tensor and its chunks.")
@click.option("--allow-crimes", is_flag=True, help="Allow mixing architectures.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1).")
@_friendly_errors
def plan_cmd(recipe: str, out_shard_size: int, chunk_size: int, compute_dtype: str, show_tensors: bool,
             allow_crimes: bool) -> None:
    """Print the plan for RECIPE without reading tensor data."""
    install_warning_format()
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    plan = build_plan(load_recipe(recipe, allow_crimes=allow_crimes), chunk_bytes=chunk_size,
                      shard_bytes=out_shard_size, compute_dtype=compute_dtype)
    click.echo(plan.summary())
    if show_tensors:
        for t in plan.tensors:
            click.echo(f"{t.describe()} shard={plan.shards[t.shard].name}@{t.offset}")


@main.command("methods")
def methods_cmd() -> None:
    """List the merge methods, what they do, and their parameters with defaults."""
    from dmerge.methods import available_methods, get_method

    for name in available_methods():
        m = get_method(name)
        click.echo("\n".join(m.describe()) if m.name == name else f"{name}: alias of {m.name}")


@main.command("demo")
@click.argument("workdir", type=click.Path(file_okay=False), default="dmerge-demo")
@click.option("--quiet", "-q", is_flag=True)
@_friendly_errors
def demo_cmd(workdir: str, quiet: bool) -> None:
    """Build a tiny base model and two fine-tunes in WORKDIR, merge them, check the result."""
    from dmerge.demo import run_demo

    run_demo(workdir, quiet=quiet)


if __name__ == "__main__":  # pragma: no cover
    main()
