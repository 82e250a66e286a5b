"""Command line: ``dmerge run|plan|demo|methods`` and the ``dmerge-yaml`` alias.

``dmerge-yaml CONFIG_FILE OUT_PATH`` takes mergekit-yaml's argument order and accepts
every flag of mergekit-yaml 0.1.5 (``dmerge run`` accepts them too, unlisted in its
``--help``). :data:`MERGEKIT_FLAGS` says what each one does here:

* the flags dmerge shares work as in mergekit (``--allow-crimes``, ``--copy-tokenizer``,
  ``--out-shard-size``, ``--random-seed``, ``--trust-remote-code``,
  ``--unsafe-truncate-embeddings``, ``--write-model-card``, ``--quiet``, ``--cuda``);
* the others are translated: GPU flags (``--device cuda``, ``--read-to-gpu``,
  ``--multi-gpu``, ``--gpu-rich``) turn on ``--cuda``, ``-j``/``--num-threads`` and
  ``--write-threads`` set the local cluster's threads, ``-v`` the log level;
* flags with nothing to do in dmerge (``--lazy-unpickle``, ``--low-cpu-memory``,
  ``--clone-tensors``, ``--async-write``, ``--no-safe-serialization``, the LoRA and cache
  paths) are accepted and explained in one line on stderr.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import signal
import sys
import threading
import traceback
import warnings

import click

from dmerge.errors import DMergeError, Terminated, install_warning_format
from dmerge.units import SIZE_HELP, parse_size


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class _MemoryLimit(click.ParamType):
    """``auto``, a plain number (handed to Dask as it is: a fraction of the machine's
    memory up to 1, else bytes) or a SIZE in dmerge's units."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        try:
            float(text)
            return text
        except ValueError:
            pass
        if text.lower() == "auto":
            return "auto"
        try:
            return parse_size(text)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = _Size()
MEMORY_LIMIT = _MemoryLimit()

# dmerge's merge options, shared by `dmerge run` and `dmerge-yaml`. Add new ones here;
# those named like a mergekit-yaml flag must keep its meaning (see MERGEKIT_FLAGS).
MERGE_OPTIONS = [
    click.option("--out-shard-size", type=SIZE, default="5B", show_default=True,
                 help="Maximum bytes per output shard (5B = five billion bytes, as mergekit)."),
    click.option("--chunk-size", type=SIZE, default=None,
                 help="Per-task memory budget, e.g. 256M (256 MiB); tensors larger than this are split by rows. "
                      "Default: 128M, less where the workers' memory limits need it."),
    click.option("--cuda/--no-cuda", default=False, help="Compute on the GPU (falls back to CPU if none)."),
    click.option("--compute-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
                 help="Arithmetic precision; the result is rounded once to the output dtype."),
    click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
                 help="Copy the base (or first) model's tokenizer files when the recipe builds no tokenizer."),
    click.option("--allow-crimes/--no-allow-crimes", default=False, help="Allow mixing architectures."),
    click.option("--allow-nan", is_flag=True, help="Write NaN/Inf produced by a merge instead of failing."),
    click.option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", default=False,
                 help="UNSAFE: without a recipe tokenizer, keep only the embedding and output-head rows all "
                      "parents have (assumes identical token ids there)."),
    click.option("--trust-remote-code/--no-trust-remote-code", default=False,
                 help="Let tokenizers that ship their own Python code run it (danger)."),
    click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of random methods (DARE, DELLA)."),
    click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
                 help="Write README.md describing the merge."),
    click.option("--scheduler", metavar="tcp://HOST:PORT", default=None, help="Use an existing Dask cluster."),
    click.option("--workers", type=click.IntRange(min=1), default=None, help="Workers of the local cluster (default 1)."),
    click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
                 help="Threads per local worker (default: the cores divided among the workers)."),
    click.option("--memory-limit", type=MEMORY_LIMIT, default="auto", show_default=True,
                 help="Memory limit per local worker, e.g. 4G (or a fraction of the machine's, e.g. 0.5)."),
    click.option("--processes", is_flag=True, help="Run local workers as separate processes instead of threads."),
    click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bar or cluster messages."),
    click.option("-v", "--verbose", "verbosity", count=True,
                 help="Show log messages (Dask's cluster events, ...): -v info, -vv debug."),
    click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Run a task that failed up to N more times (transient storage errors). Workers that die "
                      "are replaced and their tasks rerun regardless."),
    click.option("--overwrite", is_flag=True,
                 help="Replace the model in an OUT_DIR that already holds one (once the new merge is complete)."),
    click.option("--resume", is_flag=True,
                 help="Continue the interrupted merge in OUT_DIR: write only what its journal does not show done "
                      "(an absent or empty OUT_DIR starts afresh)."),
    click.option("--eval-gate", type=click.Path(dir_okay=False), default=None, metavar="GATE.yml",
                 help="Evaluate the output before declaring it done; below the gate's thresholds the output is kept "
                      "but marked (EVAL_GATE_FAILED) and the command fails (docs/evaluation.md)."),
    click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1)."),
    click.option("--push-to-hub", metavar="ORG/NAME", default=None,
                 help="Upload the finished, verified output folder to this Hugging Face Hub repository "
                      "(token from HF_TOKEN or `hf auth login`)."),
    click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private."),
    click.option("--output-format", type=click.Choice(["safetensors", "zarr"]), default="safetensors",
                 show_default=True,
                 help="zarr: write OUT_DIR as a zarr v3 group, one array per tensor (local path or fsspec URL); "
                      "`dmerge export-safetensors` turns it into an HF folder."),
    click.option("--storage-options", metavar="JSON|FILE", default=None,
                 help="fsspec options for remote storage (endpoint_url, key, secret, token, ...), as JSON or a "
                      "JSON/YAML file: keyed by protocol ({\"s3\": {...}}) or flat for every URL of the run. "
                      "Passed to the workers, never written to the output."),
]

# Every flag of mergekit-yaml 0.1.5 (its MergeOptions fields) and what it does here.
# kind "same": dmerge has this option with the same meaning (MERGE_OPTIONS);
# "mapped": translated into dmerge's options by translate_mergekit_flags;
# "no effect": accepted; when given it prints "note: FLAG has no effect: WHY".
MERGEKIT_FLAGS: dict[str, tuple[str, str]] = {
    "allow_crimes": ("same", "--allow-crimes"),
    "unsafe_truncate_embeddings": ("same", "--unsafe-truncate-embeddings (vocabulary rows cut to the fewest)"),
    "transformers_cache": ("no effect", "dmerge reads Hub models by byte range and keeps no download cache"),
    "lora_merge_cache": ("no effect", "dmerge does not apply LoRA adapters (model+adapter references are refused)"),
    "lora_merge_dtype": ("no effect", "dmerge does not apply LoRA adapters (model+adapter references are refused)"),
    "cuda": ("same", "--cuda"),
    "device": ("mapped", "cuda, cuda:N, auto (when a GPU is present): --cuda; cpu or other devices: CPU"),
    "low_cpu_memory": ("no effect", "dmerge holds only --chunk-size sized pieces of tensors in memory"),
    "out_shard_size": ("same", "--out-shard-size (bytes; a bare K/M is binary here, decimal in mergekit)"),
    "copy_tokenizer": ("same", "--copy-tokenizer"),
    "clone_tensors": ("no effect", "dmerge writes every output tensor from its own bytes"),
    "trust_remote_code": ("same", "--trust-remote-code (tokenizers with their own code)"),
    "random_seed": ("same", "--random-seed"),
    "lazy_unpickle": ("no effect", "dmerge reads safetensors by byte range"),
    "write_model_card": ("same", "--write-model-card"),
    "safe_serialization": ("no effect", "dmerge writes safetensors regardless"),
    "verbosity": ("same", "-v/--verbose: Python logging at info level, -vv debug"),
    "quiet": ("same", "--quiet"),
    "read_to_gpu": ("mapped", "--cuda (each chunk is read, then moved to the GPU)"),
    "multi_gpu": ("mapped", "--cuda, one GPU per worker process"),
    "num_threads": ("mapped", "-j N: N task threads in the local cluster"),
    "gpu_rich": ("mapped", "--cuda"),
    "async_write": ("no effect", "dmerge's tasks write their own rows in parallel as they finish"),
    "write_threads": ("mapped", "at least N task threads in the local cluster (each task writes its rows)"),
}

# The mergekit-yaml flags dmerge has no option of its own for, and their defaults
# (mergekit's, except None for "not given" where mergekit has a number).
_MERGEKIT_ONLY_DEFAULTS = {
    "transformers_cache": None, "lora_merge_cache": None, "lora_merge_dtype": None, "device": None,
    "low_cpu_memory": False, "clone_tensors": False, "lazy_unpickle": False, "safe_serialization": True,
    "read_to_gpu": False, "multi_gpu": False, "num_threads": None, "gpu_rich": False, "async_write": False,
    "write_threads": None,
}


def _mergekit_only_options(hidden: bool) -> list:
    """Click options of the mergekit-yaml flags dmerge has no option of its own for."""
    def flag(name: str, help_text: str):
        dashed = name.replace("_", "-")
        return click.option(f"--{dashed}/--no-{dashed}", default=_MERGEKIT_ONLY_DEFAULTS[name], hidden=hidden,
                            help=help_text)

    def value(decls: list[str], help_text: str, value_type=str, metavar=None):
        return click.option(*decls, type=value_type, default=None, metavar=metavar, hidden=hidden, help=help_text)

    def no_effect(name: str) -> str:
        return f"mergekit-yaml's; no effect: {MERGEKIT_FLAGS[name][1]}."

    return [
        value(["--device"], "cuda, cuda:N or auto: --cuda; cpu: --no-cuda (mergekit-yaml's).", metavar="DEVICE"),
        flag("read_to_gpu", "Same as --cuda here (mergekit-yaml's)."),
        flag("multi_gpu", "Same as --cuda here: one GPU per worker (mergekit-yaml's)."),
        click.option("--gpu-rich", is_flag=True, default=False, hidden=hidden,
                     help="Same as --cuda here (mergekit-yaml's)."),
        value(["--num-threads", "-j"], "Task threads of the local cluster, in all (mergekit-yaml's).",
              value_type=click.IntRange(min=1), metavar="N"),
        value(["--write-threads"], "At least N task threads in the local cluster; each writes its own rows "
                                   "(mergekit-yaml's).", value_type=click.IntRange(min=1), metavar="N"),
        flag("lazy_unpickle", no_effect("lazy_unpickle")),
        flag("low_cpu_memory", no_effect("low_cpu_memory")),
        flag("clone_tensors", no_effect("clone_tensors")),
        flag("safe_serialization", no_effect("safe_serialization")),
        flag("async_write", no_effect("async_write")),
        value(["--transformers-cache"], no_effect("transformers_cache"), metavar="PATH"),
        value(["--lora-merge-cache"], no_effect("lora_merge_cache"), metavar="PATH"),
        value(["--lora-merge-dtype"], no_effect("lora_merge_dtype"), metavar="DTYPE"),
    ]


def _apply(options: list, fn):
    for opt in reversed(options):
        fn = opt(fn)
    return fn


# While the background import of torch runs (start-up), SIGTERM is noted and delivered
# again once it is done: raised in the main thread in the middle of an import that
# contends with that thread's, the exception can be swallowed by importlib's lock
# bookkeeping ("Exception ignored in ... _get_module_lock") and leave the import
# deadlocked. Seen once in 7 runs of the SIGTERM test of cluster/local.sh.
_importing = threading.Event()
_term_pending = False


def _on_sigterm(signum, frame):
    global _term_pending
    if _importing.is_set():
        _term_pending = True
        return
    raise Terminated()


def _debugging(debug: bool = False) -> bool:
    return debug or os.environ.get("DMERGE_DEBUG", "") not in ("", "0")


def _merge_options(fn):
    """dmerge run's options: dmerge's own, and mergekit-yaml's accepted but not listed."""
    return _apply(MERGE_OPTIONS + _mergekit_only_options(hidden=True), fn)


def _mergekit_yaml_options(fn):
    """dmerge-yaml's options: dmerge's own and every other mergekit-yaml 0.1.5 flag."""
    return _apply(MERGE_OPTIONS + _mergekit_only_options(hidden=False), fn)


def _flag_text(name: str, value) -> str:
    dashed = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{dashed}" if value else f"--no-{dashed}"
    return f"--{dashed} {value}"


def translate_mergekit_flags(params: dict) -> tuple[dict, list[str]]:
    """Turn the mergekit-yaml flags among a command's ``params`` into dmerge's options.

    Returns the options for the merge (the mergekit-only flags removed) and the one-line
    notes to print: flags given that have no effect here, or only part of their effect.
    """
    o = dict(params)
    given = {name: o.pop(name, default) for name, default in _MERGEKIT_ONLY_DEFAULTS.items()}
    notes = []
    for name, value in given.items():
        kind, why = MERGEKIT_FLAGS[name]
        if kind == "no effect" and value != _MERGEKIT_ONLY_DEFAULTS[name]:
            notes.append(f"note: {_flag_text(name, value)} has no effect: {why}")

    # GPU: as in mergekit, an explicit --device wins over --cuda and --gpu-rich.
    device = (given["device"] or "").strip().lower()
    if device == "cpu":
        o["cuda"] = False
    elif device == "auto":
        import torch

        o["cuda"] = torch.cuda.is_available()
    elif device.startswith("cuda"):
        o["cuda"] = True
        if device not in ("cuda", "cuda:0"):
            notes.append(f"note: --device {given['device']}: dmerge computes on the current GPU; "
                         f"set CUDA_VISIBLE_DEVICES={device.partition(':')[2]} to choose it")
    elif device:
        o["cuda"] = False
        notes.append(f"note: --device {given['device']} is not supported by dmerge: computing on CPU")
    elif given["read_to_gpu"] or given["multi_gpu"] or given["gpu_rich"]:
        o["cuda"] = True
    if o.get("cuda") and (given["multi_gpu"] or given["gpu_rich"]):
        notes.append(f"note: {'--gpu-rich' if given['gpu_rich'] else '--multi-gpu'}: dmerge uses one GPU per worker "
                     "process; for several GPUs run a Dask cluster with a worker per GPU (--scheduler)")

    # Threads: every dmerge task reads, merges and writes its own rows, so mergekit's
    # compute threads (-j) and writer threads both become task threads.
    thread_flags = [_flag_text(n, given[n]) for n in ("num_threads", "write_threads") if given[n]]
    if thread_flags and (o.get("scheduler") or o.get("threads_per_worker")):
        other = "--scheduler" if o.get("scheduler") else "--threads-per-worker"
        notes += [f"note: {f} has no effect with {other}" for f in thread_flags]
    elif thread_flags:
        workers = o.get("workers") or 1
        threads = None
        if given["num_threads"]:
            threads = math.ceil(given["num_threads"] / workers)
        if given["write_threads"]:
            default = threads or max(1, (os.cpu_count() or 1) // workers)
            threads = max(default, math.ceil(given["write_threads"] / workers))
        o["threads_per_worker"] = threads
    return o, notes


def _set_verbosity(verbosity: int) -> None:
    # mergekit's -v levels: nothing (warnings), -v info, -vv debug.
    if verbosity:
        logging.basicConfig(level=logging.INFO if verbosity == 1 else logging.DEBUG)


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
        except KeyboardInterrupt as e:
            # one line, starting with the word; a merge adds how to continue it
            word = "terminated" if isinstance(e, Terminated) else "interrupted"
            click.echo("; ".join([word] + getattr(e, "__notes__", [])), err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)
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


# Set when the command line runs as its own process (a console script, python -m
# dmerge.cli): click's main() called with no arguments. Not under click's test runner.
_OWN_PROCESS = False


class _ProcessAware:
    """Notes whether the command runs as its own process (see :func:`_leave_now`)."""

    def main(self, args=None, *rest, **kwargs):
        global _OWN_PROCESS
        if args is None:
            _OWN_PROCESS = True
        return super().main(args, *rest, **kwargs)


class _Group(_ProcessAware, click.Group):
    pass


class _Command(_ProcessAware, click.Command):
    pass


def _leave_now() -> None:
    """After a finished merge in its own process: exit without tearing the interpreter
    down. Everything the merge wrote is closed and complete (files are written with
    positional writes and closed, the index last); what the teardown would still do is
    free torch's registries one by one, 0.7 s to 1 s here. Output streams and log
    handlers are flushed first."""
    if not _OWN_PROCESS:
        return
    spill = sys.modules.get("dmerge.io.spill")
    if spill is not None:  # exit handlers will not run: remove the spilled parent bytes now
        spill.spill.remove()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _run_with_mergekit_flags(recipe_path: str, out_dir: str, params: dict, moe: bool = False) -> None:
    """Translate mergekit-yaml's flags, print their notes, and run the merge (``moe``:
    the recipe is a FrankenMoE recipe in mergekit-moe's format)."""
    options, notes = translate_mergekit_flags(params)
    for note in notes:
        click.echo(note, err=True)
    _set_verbosity(options.pop("verbosity", 0))
    _do_run(recipe_path, out_dir, moe=moe, **options)
    _leave_now()


def _import_task_modules() -> None:
    try:
        import dmerge.tasks  # noqa: F401 -- torch, and the task functions the graph calls
    except Exception:  # the merge itself will import them again and report the error
        pass
    finally:
        _importing.clear()
        if _term_pending:  # a SIGTERM came meanwhile: deliver it now (see _on_sigterm)
            os.kill(os.getpid(), signal.SIGTERM)


def _do_run(recipe_path: str, out_dir: str, moe: bool = False, expert_layout: str | None = None, **o) -> None:
    # Importing torch takes most of a merge's start-up (0.7 s on a quiet 2-core machine,
    # 2-3 s on a busy one); the recipe, the plan and the output folder need none of it,
    # so it is imported meanwhile.
    global _term_pending
    _term_pending = False
    _importing.set()
    threading.Thread(target=_import_task_modules, name="dmerge-import", daemon=True).start()
    install_warning_format()
    from dmerge.execute import (ClusterOptions, check_worker_memory, chunk_budget, describe_result, run_plan,
                                worker_memory)
    from dmerge.plan import DEFAULT_CHUNK_BYTES, build_plan
    from dmerge.recipe import load_recipe

    with warnings.catch_warnings():
        if o["quiet"]:
            warnings.simplefilter("ignore")
        if moe:
            from dmerge.moe.recipe import load_moe_recipe

            recipe = load_moe_recipe(recipe_path, allow_crimes=o["allow_crimes"], expert_layout=expert_layout)
        else:
            recipe = load_recipe(recipe_path, allow_crimes=o["allow_crimes"])
    gate = None
    if o.get("eval_gate"):  # read before the merge: a bad gate fails before any heavy work
        from dmerge.gate import load_gate

        gate = load_gate(o["eval_gate"])
    device = "cpu"
    if o["cuda"]:
        from dmerge.execute import workers_with_gpu

        # the workers compute: on a cluster, theirs are the GPUs that count
        if workers_with_gpu(o["scheduler"]):
            device = "cuda"
        else:
            where = "on the cluster's workers" if o["scheduler"] else ""
            click.echo(f"warning: --cuda given but no GPU is available{' ' + where if where else ''}; "
                       "computing on CPU", err=True)
    if o["push_to_hub"]:
        from dmerge.io import storage

        if storage.is_url(out_dir):
            raise DMergeError("--push-to-hub uploads a local output folder; write the merge to a local path")
    elif o["private"]:
        raise DMergeError("--private only applies with --push-to-hub")
    storage_options = _storage_options(o["storage_options"], recipe, out_dir)
    cluster = ClusterOptions(
        storage_options=storage_options,
        scheduler=o["scheduler"],
        workers=o["workers"],
        threads_per_worker=o["threads_per_worker"],
        memory_limit=o["memory_limit"],
        processes=o["processes"],
        retries=o["retries"],
    )
    workers = worker_memory(cluster)
    plan = build_plan(
        recipe,
        # without --chunk-size: the default, or less where the workers' memory limits need it
        chunk_bytes=o["chunk_size"] or chunk_budget(workers, DEFAULT_CHUNK_BYTES),
        shard_bytes=o["out_shard_size"],
        compute_dtype=o["compute_dtype"],
        seed=o["random_seed"],
        allow_nan=o["allow_nan"],
        device=device,
        unsafe_truncate_embeddings=o["unsafe_truncate_embeddings"],
        trust_remote_code=o["trust_remote_code"],
    )
    check_worker_memory(plan, workers)
    result = run_plan(plan, out_dir, cluster=cluster, quiet=o["quiet"], copy_tokenizer=o["copy_tokenizer"],
                      write_model_card=o["write_model_card"], overwrite=o["overwrite"], resume=o["resume"],
                      resume_command=_resume_command(), output_format=o["output_format"])
    if not o["quiet"]:
        click.echo(describe_result(result))  # stdout, for scripts; progress and logs stay on stderr
    if getattr(result, "reports", None):  # (a MoE's routing report)
        from dmerge.moe.report import describe_report, parallel_rows_warning

        for report in result.reports:
            warning = parallel_rows_warning(report)
            if warning:
                click.echo(f"warning: {warning}", err=True)
            if not o["quiet"]:
                click.echo(describe_report(report))
    if gate is not None:
        _apply_gate(gate, plan, result.out_dir, o["scheduler"], o["quiet"])
    if o["push_to_hub"]:
        from dmerge.io.hub import push_to_hub

        url = push_to_hub(result.out_dir, o["push_to_hub"], private=o["private"], quiet=o["quiet"])
        if not o["quiet"]:
            click.echo(f"pushed to {url}")


def _apply_gate(gate, plan, out_dir: str, scheduler: str | None, quiet: bool) -> None:
    """Evaluate the merged model against the gate; a failure raises after marking the folder."""
    import contextlib

    from dmerge.evaluate import scores_table
    from dmerge.gate import FAILED_MARKER, EvalGateFailed, run_gate

    gate.options.quiet = quiet
    parents = {ref: m.location for ref, m in plan.models.items()}
    with contextlib.ExitStack() as stack:
        client = None
        if scheduler:
            from distributed import Client

            client = stack.enter_context(Client(scheduler, timeout="30s"))
        failures, scores = run_gate(gate, out_dir, parents, client=client)
    if not quiet:
        click.echo(scores_table(scores, [out_dir] + [p for p in parents if any(s.model == p for s in scores)]))
    if failures:
        raise EvalGateFailed(f"evaluation gate failed: {'; '.join(failures)}; the output is kept in {out_dir}, "
                             f"marked {FAILED_MARKER}")
    if not quiet:
        click.echo(f"evaluation gate passed ({len(gate.checks)} check{'s' if len(gate.checks) != 1 else ''})")


def read_storage_options(value: str | None) -> dict | None:
    """``--storage-options``: inline JSON, or the path of a JSON or YAML file."""
    if not value:
        return None
    import json

    import yaml

    text = value
    if not value.lstrip().startswith("{"):
        try:
            with open(value) as f:
                text = f.read()
        except OSError as e:
            raise DMergeError(f"--storage-options: cannot read {value}: {e.strerror or e}") from None
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise DMergeError(f"--storage-options is not valid JSON or YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise DMergeError("--storage-options must be a JSON object")
    return doc


def _storage_options(value: str | None, recipe, out_dir: str | None) -> dict:
    """Per-protocol options from ``--storage-options``, set in this process too."""
    from dmerge.io import storage

    options = read_storage_options(value)
    if not options:
        return {}
    locations = [storage.resolve_location(m, recipe.source_dir) for m in recipe.referenced_models()]
    per_protocol = storage.storage_options_for(options, locations + ([out_dir] if out_dir else []))
    storage.configure(per_protocol)
    return per_protocol


def _resume_command() -> str | None:
    """The command line that continues this merge: the command as given, with --resume
    (rebuilt from click's context, so it holds the options given on the command line)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    root = ctx.find_root().info_name
    words = ctx.command_path.split()
    if root not in ("dmerge", "dmerge-yaml") and not root.startswith("python"):
        words[:len(root.split())] = ["dmerge"]  # e.g. click's test runner
    arguments, options = [], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            arguments.append(str(value))
        elif param.name not in ("resume", "debug") and \
                ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            name = max(param.opts, key=len)
            if param.count:
                options += [name] * value
            elif param.is_flag and not value:
                options += param.secondary_opts[:1]
            elif param.is_flag:
                options.append(name)
            elif param.name == "storage_options" and str(value).lstrip().startswith("{"):
                # credentials never go into the output folder's note
                options += [name, "<the same storage options>"]
            else:
                options += [name, str(value)]
    return shlex.join(words + arguments + options + ["--resume"])


@click.group(cls=_Group)
@click.version_option(package_name="dmerge")
def main() -> None:
    """dmerge: distributed, sharded merges of large language models (mergekit recipes)."""


@main.command("run", epilog=SIZE_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@_merge_options
@_friendly_errors
def run_cmd(recipe: str, out_dir: str, **options) -> None:
    """Merge the models of RECIPE (mergekit YAML) into OUT_DIR.

    mergekit-yaml's other flags are accepted too (see dmerge-yaml --help).
    """
    _run_with_mergekit_flags(recipe, out_dir, options)


@click.command("dmerge-yaml", cls=_Command, epilog=SIZE_HELP)
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@_mergekit_yaml_options
@_friendly_errors
def mergekit_yaml(config_file: str, out_path: str, **options) -> None:
    """mergekit-yaml compatible entry point: dmerge-yaml CONFIG_FILE OUT_PATH.

    Every mergekit-yaml 0.1.5 flag is accepted; those that mean nothing here print a
    one-line note saying why.
    """
    _run_with_mergekit_flags(config_file, out_path, options)


@main.command("moe", epilog=SIZE_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--expert-layout", type=click.Choice(["per_expert", "packed"]), default=None,
              help="Expert tensors as the Hub's checkpoints name them (per_expert, default) or transformers 5's "
                   "fused tensors (packed); overrides the recipe's expert_layout.")
@_merge_options
@_friendly_errors
def moe_cmd(recipe: str, out_dir: str, expert_layout: str | None, **options) -> None:
    """Assemble a FrankenMoE from RECIPE (mergekit-moe's YAML) into OUT_DIR.

    Attention, norms and embeddings come from base_model, each expert's MLP from its
    source_model; the routers are computed from the prompts, one decoder layer at a
    time (gate_mode hidden, cheap_embed, random, uniform_random, router_input). A
    routing report is printed and written to OUT_DIR/routing_report.json.
    """
    options["expert_layout"] = expert_layout
    _run_with_mergekit_flags(recipe, out_dir, options, moe=True)


@main.command("plan", epilog=SIZE_HELP)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out-shard-size", type=SIZE, default="5B", show_default=True,
              help="Maximum bytes per output shard (5B = five billion bytes, as mergekit).")
@click.option("--chunk-size", type=SIZE, default="128M", show_default=True,
              help="Per-task memory budget (128M = 128 MiB); tensors larger than this are split by rows.")
@click.option("--compute-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Arithmetic precision the tasks would use (it sets their memory estimate).")
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every output tensor and its chunks.")
@click.option("--allow-crimes/--no-allow-crimes", default=False, help="Allow mixing architectures.")
@click.option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", default=False,
              help="UNSAFE: without a recipe tokenizer, keep only the vocabulary rows all parents have.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False,
              help="Let tokenizers that ship their own Python code run it (danger).")
@click.option("--storage-options", metavar="JSON|FILE", default=None,
              help="fsspec options for remote parents (as for run).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1).")
@_friendly_errors
def plan_cmd(recipe: str, out_shard_size: int, chunk_size: int, compute_dtype: str, show_tensors: bool,
             allow_crimes: bool, unsafe_truncate_embeddings: bool, trust_remote_code: bool,
             storage_options: str | None) -> None:
    """Print the plan for RECIPE without reading tensor data."""
    install_warning_format()
    from dmerge.plan import build_plan
    from dmerge.recipe import load_recipe

    parsed = load_recipe(recipe, allow_crimes=allow_crimes)
    _storage_options(storage_options, parsed, None)
    plan = build_plan(parsed, chunk_bytes=chunk_size,
                      shard_bytes=out_shard_size, compute_dtype=compute_dtype,
                      unsafe_truncate_embeddings=unsafe_truncate_embeddings, trust_remote_code=trust_remote_code)
    click.echo(plan.summary())
    if show_tensors:
        for t in plan.tensors:
            click.echo(f"{t.describe()} shard={plan.shards[t.shard].name}@{t.offset}")


def _unescape(text: str | None) -> str | None:
    """``--stop "\\n"`` as typed in a shell: backslash escapes turned into characters."""
    if text is None:
        return None
    return text.encode("utf-8").decode("unicode_escape")


@main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--data", "data_files", multiple=True, metavar="FILE",
              help="Evaluation data (repeatable): .jsonl with prompt/answer (exact match) or text (perplexity), "
                   "or .txt (perplexity, a document per line).")
@click.option("--lm-eval", "lm_eval_tasks", default=None, metavar="TASKS",
              help="Comma-separated lm-evaluation-harness tasks (needs lm-eval installed), e.g. gsm8k,arc_easy.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts or documents per forward pass.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Longest greedy continuation for exact match.")
@click.option("--stop", default="\\n", show_default=True,
              help="Stop string of a continuation (backslash escapes allowed; '' for none).")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per window for perplexity (default: the model's context length, at most 2048).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, metavar="OUT",
              help="Write every score (and its interval) as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None, metavar="PNG",
              help="Write a bar chart of the scores (needs matplotlib).")
@click.option("--scheduler", metavar="tcp://HOST:PORT", default=None,
              help="Evaluate on an existing Dask cluster, one task per model (in this process otherwise).")
@click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1).")
@_friendly_errors
def eval_cmd(models: tuple[str, ...], data_files: tuple[str, ...], lm_eval_tasks: str | None, batch_size: int,
             max_new_tokens: int, stop: str, max_length: int | None, device: str | None, json_out: str | None,
             plot_out: str | None, scheduler: str | None, quiet: bool) -> None:
    """Score MODEL folders (local paths or storage URLs) side by side on held-out data.

    Prints a table with a 95% interval per score: Wilson for exact-match accuracy,
    bootstrap over documents for perplexity (docs/evaluation.md).
    """
    import contextlib
    import json

    install_warning_format()
    from dmerge.evaluate import EvalOptions, evaluate, load_data, plot_scores, scores_json, scores_table

    tasks = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
    if not data_files and not tasks:
        raise DMergeError("nothing to evaluate: give --data FILE and/or --lm-eval TASKS")
    if plot_out:  # a missing matplotlib is found out before the models are scored
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise DMergeError("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    datasets = [load_data(p) for p in data_files]
    names = [d.name for d in datasets]
    for d in datasets:
        if names.count(d.name) > 1:
            d.name = d.path
    options = EvalOptions(batch_size=batch_size, max_new_tokens=max_new_tokens, stop=_unescape(stop) or None,
                          max_length=max_length, device=device, quiet=quiet)
    with contextlib.ExitStack() as stack:
        client = None
        if scheduler:
            from distributed import Client

            client = stack.enter_context(Client(scheduler, timeout="30s"))
        scores = evaluate(list(models), datasets, options, lm_eval_tasks=tasks, client=client)
    click.echo(scores_table(scores, list(models)))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(scores_json(scores, list(models), datasets, options), f, indent=2)
    if plot_out:
        plot_scores(scores, plot_out, list(models))


@main.command("search")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--eval", "eval_files", multiple=True, required=True, metavar="FILE",
              help="Data that scores candidates (repeatable; formats as for dmerge eval).")
@click.option("--holdout", "holdout_files", multiple=True, metavar="FILE",
              help="Held-out data, never seen by the search, to validate the best recipe (repeatable).")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Candidates to merge and score, the recipe as written (trial 0) included.")
@click.option("--strategy", type=click.Choice(["cmaes", "random"]), default="cmaes", show_default=True,
              help="CMA-ES (the cmaes library) or uniform random points within the bounds.")
@click.option("--population", type=click.IntRange(min=4), default=None,
              help="Candidates per generation, at least 4 (default: CMA-ES's, 4 + 3 ln d, at least 4).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search (and of random methods).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="best-recipe.yml", show_default=True,
              help="Where the best recipe goes, its scores as comments on top.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="JSON-lines trial log; an existing one is resumed (default: OUT with .trials.jsonl).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where candidates are written (default: a temporary folder); each is removed once scored.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts or documents per forward pass of an evaluation.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Longest greedy continuation for exact match.")
@click.option("--stop", default="\\n", show_default=True, help="Stop string of a continuation.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", default=None, help="Use an existing Dask cluster.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Workers of the local cluster (default 1).")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
              help="Threads per local worker (default: the cores divided among the workers).")
@click.option("--allow-crimes/--no-allow-crimes", default=False, help="Allow mixing architectures.")
@click.option("--quiet/--no-quiet", "-q", default=False, help="Only the result lines (no trial lines).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1).")
@_friendly_errors
def search_cmd(recipe: str, eval_files: tuple[str, ...], holdout_files: tuple[str, ...], trials: int, strategy: str,
               population: int | None, seed: int, out_path: str, log_path: str | None, workdir: str | None,
               batch_size: int, max_new_tokens: int, stop: str, scheduler: str | None, workers: int | None,
               threads_per_worker: int | None, allow_crimes: bool, quiet: bool) -> None:
    """Search RECIPE's numeric parameters (weights, densities, t, gradients) for the best
    score on --eval data: CMA-ES or random search, every candidate merged and evaluated on
    the cluster, every trial logged (resumable), the best recipe written with its scores
    on both the search and the --holdout data (docs/evaluation.md)."""
    install_warning_format()
    from dmerge.evaluate import EvalOptions, load_data, scores_table
    from dmerge.search import objective, run_search

    datasets = [load_data(p) for p in eval_files]
    holdout = [load_data(p) for p in holdout_files]
    for d in holdout:  # the same stem in both splits: tell them apart
        if d.name in {e.name for e in datasets}:
            d.name += "@holdout"
    options = EvalOptions(batch_size=batch_size, max_new_tokens=max_new_tokens, stop=_unescape(stop) or None)
    result = run_search(recipe, datasets, holdout, trials=trials, strategy=strategy, population=population,
                        seed=seed, options=options, out_path=out_path,
                        log_path=log_path or os.path.splitext(out_path)[0] + ".trials.jsonl", scheduler=scheduler,
                        workers=workers, threads_per_worker=threads_per_worker, workdir=workdir, quiet=quiet,
                        allow_crimes=allow_crimes, echo=lambda line: click.echo(line, err=True))
    best, start = result.best, result.start
    click.echo(f"best: trial {best['trial']} of {len(result.trials)}, search objective {best['objective']:.4f} "
               f"(recipe as written: {start['objective']:.4f})")
    if result.best_holdout:
        click.echo(f"held-out objective: best {objective(result.best_holdout):.4f}, "
                   f"recipe as written {objective(result.start_holdout):.4f}")
        for s in result.start_holdout:
            s.model = "as written"
        for s in result.best_holdout:
            s.model = "best"
        click.echo(scores_table(result.start_holdout + result.best_holdout, ["as written", "best"]))
    click.echo(f"wrote {out_path}")
@main.command("export-safetensors")
@click.argument("zarr_group")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace the model in an OUT_DIR that already holds one.")
@click.option("--storage-options", metavar="JSON|FILE", default=None,
              help="fsspec options when ZARR_GROUP is a URL (as for dmerge run).")
@click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also DMERGE_DEBUG=1).")
@_friendly_errors
def export_safetensors_cmd(zarr_group: str, out_dir: str, overwrite: bool, storage_options: str | None,
                           quiet: bool) -> None:
    """Write the zarr group ZARR_GROUP (from `dmerge run --output-format zarr`) as an HF
    folder OUT_DIR: the safetensors shards, index, config and tokenizer files that
    `dmerge run` would have written, byte for byte."""
    from tqdm import tqdm

    from dmerge.io import storage
    from dmerge.io.zarr_store import export_safetensors

    options = read_storage_options(storage_options)
    if options:
        storage.configure(storage.storage_options_for(options, [zarr_group]))
    with tqdm(unit="B", unit_scale=True, desc="exporting", disable=quiet, file=sys.stderr) as bar:
        counts = export_safetensors(zarr_group, out_dir, overwrite=overwrite, progress=bar.update)
    if not quiet:
        click.echo(f"wrote {out_dir}: {counts['tensors']} tensors in {counts['shards']} shard"
                   f"{'s' if counts['shards'] != 1 else ''} ({counts['bytes']} B)")


@main.command("methods")
def methods_cmd() -> None:
    """List the merge methods, what they do, and their parameters with defaults."""
    from dmerge.methods import available_methods, get_method

    for name in available_methods():
        m = get_method(name)
        click.echo("\n".join(m.describe()) if m.name == name else f"{name}: alias of {m.name}")


@main.command("demo")
@click.argument("workdir", type=click.Path(file_okay=False), default="dmerge-demo")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (dmerge's or transformers').")
@_friendly_errors
def demo_cmd(workdir: str, quiet: bool) -> None:
    """Build a tiny base model and two fine-tunes in WORKDIR (default ./dmerge-demo), merge them, check the result."""
    from dmerge.demo import run_demo

    run_demo(workdir, quiet=quiet)


if __name__ == "__main__":  # pragma: no cover
    main()
