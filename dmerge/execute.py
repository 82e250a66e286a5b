"""Run a plan on a Dask cluster and finish the output folder.

Scheduling lives here, apart from the math (:mod:`dmerge.methods`) and the I/O
(:mod:`dmerge.io`). By default an in-process ``distributed.LocalCluster`` runs the graph
(threads share one process: no pickling, one copy of torch in memory); with a scheduler
address, an existing cluster does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass

import yaml

from dmerge.errors import DMergeError, MergeExecutionError
from dmerge.graph import build_graph
from dmerge.io import storage
from dmerge.io.model_source import TOKENIZER_FILES
from dmerge.io.output import LocalOutput
from dmerge.plan import Plan
from dmerge.units import format_bytes


@dataclass
class ClusterOptions:
    scheduler: str | None = None  # tcp://host:port of an existing cluster
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = "auto"
    processes: bool = False


@dataclass
class RunResult:
    out_dir: str
    seconds: float
    bytes_read: int
    bytes_written: int
    n_tasks: int


@contextlib.contextmanager
def dask_client(options: ClusterOptions, quiet: bool = False):
    """A distributed Client: an existing scheduler's, or a fresh in-process LocalCluster."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": False, "distributed.admin.tick.limit": "10s",
                          "distributed.logging.distributed": "error"}):
        if options.scheduler:
            client = Client(options.scheduler, timeout="30s")
            cluster = None
        else:
            n_cpu = os.cpu_count() or 1
            workers = options.workers or 1
            threads = options.threads_per_worker or max(1, n_cpu // workers)
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=options.processes,
                memory_limit=options.memory_limit or "auto",
                dashboard_address=":0",
                silence_logs=50,
            )
            client = Client(cluster)
        try:
            if not quiet:
                link = getattr(client, "dashboard_link", None)
                if link and options.scheduler is None and importlib.util.find_spec("bokeh") is None:
                    link += " (needs bokeh: pip install 'dmerge[dashboard]')"
                where = options.scheduler or _describe_local(cluster, options.processes)
                print(f"dask: {where}; dashboard: {link or 'unavailable'}", file=sys.stderr)
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _describe_local(cluster, processes: bool) -> str:
    workers = list(cluster.workers.values())
    threads = getattr(workers[0], "nthreads", None) if workers else None
    n = len(workers)
    what = (f"{n} worker process{'es' if n != 1 else ''}" if processes
            else f"in-process, {n} worker{'s' if n != 1 else ''}")
    return f"local cluster ({what}" + (f" x {threads} thread{'s' if threads != 1 else ''})" if threads else ")")


def _set_torch_threads(n_tasks_in_parallel: int) -> None:
    # Each Dask thread runs its own task; letting torch also fan out oversubscribes cores.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, n_tasks_in_parallel)))


def run_id(plan: Plan, out_dir: str) -> str:
    """The run's identity in graph keys: the plan's fingerprint and where it writes."""
    return hashlib.sha256(f"{plan.fingerprint()} {os.path.abspath(out_dir)}".encode()).hexdigest()[:16]


def run_plan(plan: Plan, out_dir: str, *, cluster: ClusterOptions | None = None, quiet: bool = False,
             copy_tokenizer: bool = True, write_model_card: bool = True, overwrite: bool = False) -> RunResult:
    """Execute the plan into ``out_dir``; on any failure, remove what was written.

    A folder that already holds model weights is refused unless ``overwrite``; with it,
    the earlier weights are removed only once the new ones are complete.
    """
    from distributed import as_completed
    from tqdm import tqdm

    cluster = cluster or ClusterOptions()
    output = LocalOutput(out_dir, overwrite=overwrite)
    start = time.perf_counter()
    try:
        output.prepare(plan.shards)
        paths = [output.shard_path(s.name) for s in plan.shards]
        dsk, keys = build_graph(plan, paths, run_id(plan, out_dir))
        bytes_read = bytes_written = 0
        with dask_client(cluster, quiet=quiet) as client:
            threads = sum(client.nthreads().values())
            if not cluster.scheduler:
                _set_torch_threads(threads)
            futures = client.get(dsk, keys, sync=False)
            # the bar counts tensor bytes, what the tasks report (headers are written up front)
            bar = tqdm(total=sum(t.nbytes for t in plan.tensors), unit="B", unit_scale=True, desc="merging",
                       disable=quiet, file=sys.stderr, smoothing=0.1)
            try:
                for fut in as_completed(futures):
                    if fut.status == "error":
                        exc = fut.exception()
                        client.cancel(futures)
                        raise exc
                    r, w = fut.result()
                    bytes_read += r
                    bytes_written += w
                    bar.update(w)
            finally:
                bar.close()
        output.commit_shards(plan.shards)
        finish_output(plan, output, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
    except BaseException as e:
        output.abort()
        if isinstance(e, (DMergeError, KeyboardInterrupt)) or not isinstance(e, Exception):
            raise
        raise MergeExecutionError(f"merge failed: {one_line(e)}") from e
    header_bytes = sum(len(s.header) for s in plan.shards)
    return RunResult(output.folder, time.perf_counter() - start, bytes_read, bytes_written + header_bytes, len(dsk))


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def finish_output(plan: Plan, output: LocalOutput, *, copy_tokenizer: bool, write_model_card: bool) -> None:
    """config.json, tokenizer, recipe, model card, and finally the index."""
    from dmerge.recipe import INTERNAL_FIELDS

    recipe = plan.recipe
    output.write_json("config.json", plan.out_config)
    write_tokenizer(plan, output, copy_tokenizer=copy_tokenizer)
    text = recipe.source_text or yaml.safe_dump(recipe.model_dump(exclude_none=True, exclude=set(INTERNAL_FIELDS)))
    output.write_text("mergekit_config.yml", text)
    if write_model_card:
        from dmerge.modelcard import model_card

        output.write_text("README.md", model_card(plan, name=os.path.basename(output.folder.rstrip("/"))))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in plan.tensors), "merged_by": "dmerge"},
        "weight_map": {t.name: plan.shards[t.shard].name for t in plan.tensors},
    }
    output.write_index(index)  # last: marks the folder complete


def write_tokenizer(plan: Plan, output: LocalOutput, *, copy_tokenizer: bool) -> None:
    """The merged tokenizer if the recipe built one; else the donor's files, copied.

    The donor is the base model (else the first model); its generation_config.json comes
    along unless --no-copy-tokenizer. A ``chat_template`` is set on whichever tokenizer is
    written (the donor's is then loaded and saved again, as mergekit does).
    """
    from dmerge.tokenizer import load_tokenizer, tokenizer_files

    chat = plan.chat_template
    tok_ref = _tokenizer_model(plan)
    model = plan.models[tok_ref] if tok_ref is not None else None
    if plan.tokenizer is not None:
        for name, data in tokenizer_files(plan.tokenizer.tokenizer, chat).items():
            output.write_bytes(name, data)
        extra = ["generation_config.json"] if copy_tokenizer and model is not None else []
    elif not copy_tokenizer or model is None:
        return
    elif chat:
        donor = load_tokenizer(model.location, f"model {tok_ref}", plan.trust_remote_code)
        for name, data in tokenizer_files(donor, chat).items():
            output.write_bytes(name, data)
        extra = ["generation_config.json"]
    else:
        extra = list(TOKENIZER_FILES)
    for name in extra:
        src = storage.join(model.location, name)
        try:
            if storage.exists(src):
                output.write_bytes(name, storage.read_bytes(src))
        except OSError:
            continue


def _tokenizer_model(plan: Plan) -> str | None:
    """The model whose tokenizer files are copied: the base model, else the first one."""
    recipe = plan.recipe
    if recipe.base_model in plan.models:
        return recipe.base_model
    return next(iter(plan.models), None)


def describe_result(result: RunResult) -> str:
    rate = result.bytes_read / result.seconds if result.seconds else 0
    return (f"wrote {result.out_dir}: {format_bytes(result.bytes_written)} in {result.seconds:.1f} s "
            f"({format_bytes(result.bytes_read)} read, {format_bytes(rate)}/s, {result.n_tasks} tasks)")


__all__ = ["ClusterOptions", "RunResult", "run_plan", "describe_result", "dask_client"]
