"""Run a plan's graph and finish the output folder.

Scheduling lives here, apart from the math (:mod:`dmerge.methods`) and the I/O
(:mod:`dmerge.io`). By default a thread pool in this process runs the graph's tasks
(:mod:`dmerge.threaded`: nothing to start, the first task runs as soon as the graph is
built); ``--workers`` or ``--processes`` start a ``distributed.LocalCluster``, and a
scheduler address uses an existing cluster. The tasks, and so the bytes, are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import yaml

from dmerge.errors import DMergeError, MergeExecutionError, Terminated
from dmerge.graph import build_graph, build_part_graph, part_groups, waves
from dmerge.io import storage
from dmerge.io.model_source import TOKENIZER_FILES
from dmerge.io.journal import (JOURNAL_FORMAT, JOURNAL_NAME, Journal, WriteUnit, check_same_plan, read_journal,
                               remove_journal, write_marker)
from dmerge.io.object_output import ObjectOutput, is_object_store, plan_parts
from dmerge.io.output import LocalOutput, checksum_range
from dmerge.io.sinks import LocalShard
from dmerge.plan import Plan
from dmerge.units import format_bytes
from dmerge.worker_env import host_task_threads, usable_cores


@dataclass
class ClusterOptions:
    scheduler: str | None = None  # tcp://host:port of an existing cluster
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = "auto"
    processes: bool = False
    retries: int = 0  # extra tries of a task that raised (transient storage errors)
    storage_options: dict | None = None  # protocol -> fsspec options, set on every worker


@dataclass
class RunResult:
    out_dir: str
    seconds: float
    bytes_read: int
    bytes_written: int
    n_tasks: int
    units: int = 0  # write units of the plan
    units_resumed: int | None = None  # of them, done by an earlier run and verified (resumed runs only)
    peak_memory: dict = None  # worker address -> peak resident bytes of its process
    reruns: int = 0  # tasks run again: after a worker died holding them, or retried (--retries)
    reports: list = None  # what the plan's computations report (a MoE's routing report)


@contextlib.contextmanager
def dask_client(options: ClusterOptions, quiet: bool = False):
    """A distributed Client: an existing scheduler's, or a fresh in-process LocalCluster."""
    import dask
    from distributed import Client, LocalCluster

    from dmerge.worker_plugin import WorkerSetup

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
            client.register_plugin(WorkerSetup(host_task_threads(client.scheduler_info()["workers"]),
                                               options.storage_options))
            if not quiet:
                link = getattr(client, "dashboard_link", None)
                if link and options.scheduler is None and importlib.util.find_spec("bokeh") is None:
                    link += " (needs bokeh: pip install 'dmerge[dashboard]')"
                where = options.scheduler or _describe_local(client, options.processes)
                print(f"dask: {where}; dashboard: {link or 'unavailable'}", file=sys.stderr)
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


class _DeferredInterrupts:
    """Ctrl-C and SIGTERM while the cluster runs the merge: noted by the handler and raised
    by the client's own loop (:func:`_finished`), never inside Dask's code. Raised
    there, half-way through starting a cluster, registering a plugin or submitting a
    graph, the exception left the client waiting forever for futures that would not
    come. On leaving, the usual handlers are back and a noted signal is raised."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.signum = signum

    def raise_pending(self) -> None:
        if self.signum is not None:
            raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc[0] is None:
            self.raise_pending()
        return False


def _finished(completed, interrupts: _DeferredInterrupts):
    """The futures of ``completed`` as they finish, checking for a noted signal between
    short waits."""
    while True:
        interrupts.raise_pending()
        batch = completed.next_batch(block=False)
        if batch:
            yield from batch
        elif completed.is_empty():
            return
        else:
            time.sleep(0.05)


def _describe_local(client, processes: bool) -> str:
    threads = list(client.nthreads().values())
    n = len(threads)
    what = (f"{n} worker process{'es' if n != 1 else ''}" if processes
            else f"in-process, {n} worker{'s' if n != 1 else ''}")
    each = f" x {threads[0]} thread{'s' if threads[0] != 1 else ''}" if threads and len(set(threads)) == 1 else ""
    return f"local cluster ({what}{each})"


# Tasks submitted to the scheduler at once. It takes in a graph at about 0.5 ms per task
# and schedules nothing meanwhile: a 50,000-task graph submitted whole would delay the
# first write by half a minute; in waves the work starts after the first.
TASKS_PER_WAVE = 4000

# How long a merge on an existing cluster waits for its first worker.
WAIT_FOR_WORKERS_S = 60

# What a worker process holds before any task: the interpreter, torch, distributed
# (measured: 248 MiB). An in-process worker shares the client's process, whose
# resident size counts instead where it is larger.
WORKER_BASELINE_BYTES = 300 << 20
# The share of a worker's memory limit its process may plan to fill: Dask starts
# spilling at 70 % and pauses a worker at 80 % of its limit, and reads in flight and
# allocator slack come on top of what tasks plan to hold.
PLANNED_MEMORY_SHARE = 0.6


@dataclass(frozen=True)
class WorkerMemory:
    """What one worker can give its tasks."""

    limit: int | None  # bytes; None: no limit
    threads: int
    baseline: int = WORKER_BASELINE_BYTES

    def per_task(self) -> float:
        """Bytes one task may plan to hold (inf without a limit)."""
        if not self.limit:
            return math.inf
        return (self.limit * PLANNED_MEMORY_SHARE - self.baseline) / max(1, self.threads)

    def limit_for(self, task_bytes: int) -> int:
        """The memory limit at which tasks of ``task_bytes`` would fit."""
        return math.ceil((task_bytes * max(1, self.threads) + self.baseline) / PLANNED_MEMORY_SHARE)


def worker_memory(options: ClusterOptions) -> list[WorkerMemory]:
    """What each worker the merge will use can give its tasks, known before the merge
    starts: from the scheduler, or the local cluster's options."""
    if options.scheduler:
        from distributed import Client

        with Client(options.scheduler, timeout="30s") as client:
            try:  # the merge is planned for the workers it will have: wait for the first
                client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
            except TimeoutError:
                raise DMergeError(f"no worker joined the scheduler at {options.scheduler} within "
                                  f"{WAIT_FOR_WORKERS_S} s; start workers (dask worker {options.scheduler})") from None
            info = client.scheduler_info()["workers"]
        return [WorkerMemory(w.get("memory_limit") or None, int(w.get("nthreads", 1))) for w in info.values()]
    if runs_in_threads(options):  # no cluster: the tasks share this process's memory
        from dmerge.allocator import resident_bytes
        from dmerge.threaded import local_memory_limit

        threads = local_threads(options)
        return [WorkerMemory(local_memory_limit(options.memory_limit), threads,
                             max(WORKER_BASELINE_BYTES, resident_bytes()))]
    import logging

    from distributed.worker_memory import parse_memory_limit

    from dmerge.allocator import resident_bytes

    cores = usable_cores()
    workers = options.workers or 1
    threads = options.threads_per_worker or max(1, cores // workers)
    limit = parse_memory_limit(options.memory_limit or "auto", threads, total_cores=threads * workers,
                               logger=logging.getLogger("dmerge"))
    baseline = WORKER_BASELINE_BYTES if options.processes else max(WORKER_BASELINE_BYTES, resident_bytes())
    return [WorkerMemory(limit, threads, baseline)] * workers


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def workers_with_gpu(scheduler: str | None) -> int:
    """How many workers can compute on a GPU: those of the scheduler's cluster that see
    one or declare one (``--resources GPU=1``), or this process (the local cluster's
    workers run here or on this machine)."""
    if not scheduler:
        return int(_cuda_available())
    from distributed import Client

    with Client(scheduler, timeout="30s") as client:
        return len(_gpu_declared(client) | {a for a, ok in client.run(_cuda_available).items() if ok})


def _gpu_declared(client) -> set[str]:
    """Workers that declare a GPU resource (``dask worker --resources GPU=1``)."""
    return {a for a, w in client.scheduler_info()["workers"].items() if w.get("resources", {}).get("GPU")}


def chunk_budget(workers: list[WorkerMemory], default: int) -> int:
    """The per-task memory budget the smallest worker allows (at most ``default``)."""
    budget = min([default] + [w.per_task() for w in workers])
    return max(1, int(budget))  # a hopeless limit plans one row per task; check_worker_memory then refuses it


def check_worker_memory(plan: Plan, workers: list[WorkerMemory]) -> None:
    """Refuse up front a merge whose largest task does not fit a worker's memory limit
    (the worker would be paused for memory, or killed, over and over)."""
    need = plan.peak_task_bytes
    for w in workers:
        if need > w.per_task():
            threads = f"{w.threads} thread{'s' if w.threads > 1 else ''}"
            raise DMergeError(
                f"a worker's memory limit of {format_bytes(w.limit)} ({threads}) is too small: the largest task of "
                f"this merge holds {format_bytes(need)} and the worker itself {format_bytes(w.baseline)}; give "
                f"workers at least {format_bytes(w.limit_for(need))} (or fewer threads, or a smaller --chunk-size)"
            )


def run_id(plan: Plan, out_dir: str, fingerprint: str | None = None) -> str:
    """The run's identity in graph keys: the plan's fingerprint and where it writes."""
    fingerprint = fingerprint or plan.fingerprint()
    place = out_dir if storage.is_url(out_dir) else os.path.abspath(out_dir)  # a URL is the same from any folder
    return hashlib.sha256(f"{fingerprint} {place}".encode()).hexdigest()[:16]


def run_plan(plan: Plan, out_dir: str, *, cluster: ClusterOptions | None = None, quiet: bool = False,
             copy_tokenizer: bool = True, write_model_card: bool = True, overwrite: bool = False,
             resume: bool = False, resume_command: str | None = None,
             output_format: str = "safetensors") -> RunResult:
    """Execute the plan into ``out_dir``.

    ``output_format`` "zarr": a zarr v3 group instead of a safetensors folder
    (:mod:`dmerge.io.zarr_store`; no journal: a failed or interrupted zarr merge removes
    what it wrote, and --resume is refused).

    A folder that already holds model weights is refused unless ``overwrite``; with it,
    the earlier weights are removed only once the new ones are complete.

    While the merge runs, the folder holds a journal of the finished write units and a
    note that the merge is unfinished, with ``resume_command`` (see
    :mod:`dmerge.io.journal`). Interrupted (Ctrl-C, SIGTERM; or killed), the folder is
    left unfinished: ``resume`` continues it, writing only what the journal does not
    vouch for (:func:`verified_units`). Any other failure removes what was written.
    ``resume`` on an absent or empty folder starts afresh.
    """
    from tqdm import tqdm

    cluster = cluster or ClusterOptions()
    storage.configure(cluster.storage_options or {})
    to_zarr = output_format == "zarr"
    if to_zarr and resume:
        raise DMergeError("--resume is not available with --output-format zarr: a zarr merge that stops "
                          "removes what it wrote; run it again")
    to_objects = not to_zarr and storage.is_url(out_dir) and is_object_store(out_dir)
    if to_zarr and plan.computations:
        raise DMergeError("a FrankenMoE (computed routers) is written as safetensors (a folder or s3://), not "
                          "as a zarr group yet")
    if to_zarr:
        from dmerge.io.zarr_store import ZarrOutput, align_plan

        plan = align_plan(plan)  # every task writes whole zarr shards of whole inner chunks
        output = ZarrOutput(out_dir, overwrite=overwrite)
    else:
        output = (ObjectOutput(out_dir, overwrite=overwrite) if to_objects
                  else LocalOutput(out_dir, overwrite=overwrite))
    fingerprint = plan.fingerprint()  # hashes every tensor's sources and row map: once
    rid = run_id(plan, out_dir, fingerprint)
    start = time.perf_counter()
    journal = None
    started = False  # the output holds this run's unfinished state (journal, uploads)
    resuming = resume and (to_objects or _check_resumable(output.folder))
    parts = plan_parts(plan) if to_objects else None
    try:
        header = journal_header(plan, rid, fingerprint)
        done: list[WriteUnit] = []
        if to_objects:
            done_parts = output.begin(plan, header, resume, resume_command, parts)
            started = True
            dsk, keys = build_part_graph(plan, parts, output.sinks(plan), rid, done=done_parts)
            groups = part_groups(parts, plan)
            done_bytes = sum(p.size for p in parts if (p.shard, p.number) in done_parts)
            units, units_done = len(parts), len(done_parts)
        elif to_zarr:
            output.prepare(plan, rid)
            started = True
            dsk, keys = build_graph(plan, output.sink_for, rid)
            groups = None
            done_bytes = 0
            units, units_done = sum(t.n_chunks for t in plan.tensors), 0
        else:
            if resuming:
                earlier, journaled = read_journal(output.folder)
                check_same_plan(output.folder, earlier.get("fingerprint"), header["fingerprint"])
                fresh = output.prepare(plan.shards, resume=True)
                done = verified_units(plan, output, [u for u in journaled if u.shard not in fresh])
            else:
                output.prepare(plan.shards)
            journal = Journal(output.folder, header, done)
            started = True
            write_marker(output.folder, resume_command)
            sinks = [LocalShard(output.shard_path(s.name)) for s in plan.shards]
            dsk, keys = build_graph(plan, sinks, rid, done={(u.t, u.c) for u in done})
            groups = None
            done_bytes = sum(u.length for u in done)
            units, units_done = sum(t.n_chunks for t in plan.tensors), len(done)
        header_bytes = sum(len(s.header) for s in plan.shards)
        # the bar counts output bytes, what the tasks report (local shard headers are
        # written up front; an upload part carries its shard's header)
        finished = _Finished(plan, journal, _report_keys(keys), lambda: tqdm(
            total=sum(t.nbytes for t in plan.tensors) + (header_bytes if to_objects else 0), initial=done_bytes,
            unit="B", unit_scale=True, desc="merging", disable=quiet, file=sys.stderr, smoothing=0.1))
        try:
            if runs_in_threads(cluster):
                peaks, reruns = _run_in_threads(dsk, keys, cluster, finished, quiet)
            else:
                peaks, reruns = _run_on_cluster(plan, dsk, keys, cluster, finished, quiet, groups)
        finally:
            finished.close()
        bytes_read, bytes_written = finished.bytes_read, finished.bytes_written
        if to_objects:
            output.commit_shards(plan.shards, parts)
        elif not to_zarr:
            output.commit_shards(plan.shards)
        reports = [value for _, value in sorted(finished.reports, key=lambda kv: kv[0][0])]
        finish_output(plan, output, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                      reports=_report_files(plan, reports))
        if journal is not None:
            journal.close()
            remove_journal(output.folder)  # the index is written: the folder is complete
    except BaseException as e:
        if journal is not None:
            journal.close()
        if isinstance(e, KeyboardInterrupt) and (started or resuming) and not to_zarr:
            # Left unfinished on purpose: partial shards and journal (or the uploads and
            # their run file) and the marker stay.
            # a note (what add_note does on Python >= 3.11) the command line prints
            e.__notes__ = [*getattr(e, "__notes__", []), f"the unfinished merge in {output.folder} can be continued: "
                           f"{resume_command or 'run the same command with --resume'}"]
            raise
        if started or not resuming:  # a resume that failed before starting leaves the output as it was
            _abort(output, e)
            if journal is not None:
                remove_journal(output.folder)
        if isinstance(e, (DMergeError, KeyboardInterrupt)) or not isinstance(e, Exception):
            raise
        raise MergeExecutionError(f"merge failed: {one_line(e)}") from e
    if not to_objects and not to_zarr:
        bytes_written += header_bytes
    return RunResult(output.folder, time.perf_counter() - start, bytes_read, bytes_written, len(dsk),
                     units=units, units_resumed=units_done if resuming else None,
                     peak_memory=peaks, reruns=reruns, reports=reports)


def _report_files(plan: Plan, reports: list) -> dict:
    """The files the computations' reports go to in the output folder (``report_file``)."""
    with_report = [c for c in plan.computations if getattr(c, "report_file", None)]
    return {c.report_file: r for c, r in zip(with_report, reports)}


def _report_keys(keys: list) -> set:
    """The graph's output keys that are computations' reports, not writes."""
    from dmerge.graph import COMPUTATION_INDEX

    return {k for k in keys if k[1] == COMPUTATION_INDEX}


def _abort(output, error: BaseException) -> None:
    """Undo a failed run's output; a failure to clean up is noted on the error, not raised
    over it."""
    try:
        output.abort()
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        error.__notes__ = [*getattr(error, "__notes__", []), f"cleaning up {output.folder} failed too: {one_line(e)}"]


class _Finished:
    """What the client does with each finished write task, on either path: journal the
    unit, count its bytes, move the progress bar (shown by :meth:`start`, once the
    path has said where the merge runs)."""

    def __init__(self, plan: Plan, journal: Journal | None, report_keys: set, make_bar):
        self.plan, self.journal, self._make_bar = plan, journal, make_bar
        self.report_keys = report_keys
        self.reports: list = []  # (key, value) of the computations' reports
        self.bar = None
        self.bytes_read = self.bytes_written = 0

    def start(self) -> None:
        self.bar = self._make_bar()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, key: tuple, value) -> None:
        if key in self.report_keys:
            self.reports.append((key, value))
            return
        r, w, checksum = value
        if self.journal is not None:  # local folders; an upload's part list is its own journal
            self.journal.record(_unit(self.plan, key, w, checksum))
        self.bytes_read += r
        self.bytes_written += w
        self.bar.update(w)


def runs_in_threads(cluster: ClusterOptions) -> bool:
    """Whether the merge runs on a thread pool in this process (:mod:`dmerge.threaded`):
    when no cluster is asked for (no scheduler, no worker count, no processes)."""
    return not (cluster.scheduler or cluster.workers or cluster.processes)


def local_threads(cluster: ClusterOptions) -> int:
    """Task threads of a merge without a cluster: --threads-per-worker, else one per core."""
    return cluster.threads_per_worker or usable_cores()


def _run_in_threads(dsk: dict, keys: list, cluster: ClusterOptions, finished: _Finished,
                    quiet: bool) -> tuple[dict, int]:
    """Run the graph on a thread pool here; returns (peak memory, tasks rerun)."""
    from dmerge.threaded import local_memory_limit, run_graph

    threads = local_threads(cluster)
    if not quiet:
        print(f"running in this process on {threads} thread{'s' if threads != 1 else ''} (no cluster: "
              "--workers, --processes or --scheduler give one)", file=sys.stderr)
    finished.start()
    with _DeferredInterrupts() as interrupts:
        reruns = run_graph(dsk, keys, threads=threads, on_result=finished, poll=interrupts.raise_pending,
                           retries=cluster.retries, memory_limit=local_memory_limit(cluster.memory_limit))
    return {"local": _peak_process_memory()}, reruns


def _run_on_cluster(plan: Plan, dsk: dict, keys: list, cluster: ClusterOptions, finished: _Finished,
                    quiet: bool, groups: dict[int, int] | None = None) -> tuple[dict, int]:
    """Run the graph on a Dask cluster, submitted in waves; returns (each worker's peak
    memory, tasks rerun). ``groups``: tensors whose tasks share upload parts, kept in one
    wave (:func:`dmerge.graph.part_groups`)."""
    from distributed import as_completed

    with _DeferredInterrupts() as interrupts, dask_client(cluster, quiet=quiet) as client:
        # with --cuda on a cluster whose workers declare GPUs (`--resources GPU=1`), the
        # arithmetic goes to those; byte copies go to any worker
        gpu_workers = plan.device != "cpu" and bool(_gpu_declared(client))
        members: dict[int, list[int]] = {}
        for t, g in (groups or {}).items():
            members.setdefault(g, []).append(t)
        pending = waves(dsk, keys, TASKS_PER_WAVE, group_of=groups,
                        kind_of=lambda g: "copy" if all(plan.tensors[t].copy_bytes for t in members.get(g, [g]))
                        else "compute")
        futures = []
        completed = as_completed()

        def submit_wave() -> None:
            wave_dsk, wave_keys, kind = pending.pop(0)
            resources = {"GPU": 1} if gpu_workers and kind == "compute" else None
            submitted = client.get(wave_dsk, wave_keys, sync=False, retries=cluster.retries or None,
                                   resources=resources)
            futures.extend(submitted)
            completed.update(submitted)

        submit_wave()
        if pending:
            submit_wave()  # two waves in flight: the next one is taken in while one runs
        finished.start()
        for fut in _finished(completed, interrupts):
            if pending and completed.count() < TASKS_PER_WAVE:
                submit_wave()
            if fut.status == "error":
                exc = fut.exception()
                client.cancel(futures)
                raise exc
            finished(fut.key, fut.result())
        return _peak_memory(client), _reruns(client, list(dsk), cluster.retries)


def _reruns(client, keys: list, retries: int) -> int:
    """How many of the run's tasks ran more than once: lost with a worker that died (the
    scheduler counts them as suspicious) or retried after an error."""
    def count(dask_scheduler, keys=None, retries=0):
        n = 0
        for key in keys:
            ts = dask_scheduler.tasks.get(key)
            if ts is not None and (ts.suspicious or (retries and ts.retries < retries)):
                n += 1
        return n

    try:
        return client.run_on_scheduler(count, keys=list(keys), retries=retries)
    except Exception:  # informative only
        return 0


def _peak_process_memory() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_memory(client) -> dict:
    """Each worker's peak resident memory (its whole process: an in-process worker
    shares the client's)."""
    try:
        return client.run(_peak_process_memory)
    except Exception:  # a worker lost at the very end: the figure is only informative
        return {}


def _check_resumable(folder: str) -> bool:
    """With --resume: True if ``folder`` holds a journal to resume from; False if it is
    absent or empty (the merge starts afresh); else a one-line error."""
    if os.path.exists(os.path.join(folder, JOURNAL_NAME)):
        return True
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if not names:
        return False
    if "model.safetensors.index.json" in names:
        raise DMergeError(f"{folder} holds a finished merge; there is nothing to resume")
    raise DMergeError(f"there is no unfinished dmerge merge in {folder} to resume ({JOURNAL_NAME} is missing); "
                      "run without --resume")


def journal_header(plan: Plan, rid: str, fingerprint: str) -> dict:
    """The journal's first line: what the run is (see :mod:`dmerge.io.journal`)."""
    from dmerge import __version__

    return {"dmerge_journal": JOURNAL_FORMAT, "fingerprint": fingerprint, "run_id": rid,
            "dmerge_version": __version__, "checksum": "crc32",
            "shards": [{"name": s.name, "size": s.size} for s in plan.shards],
            "units": sum(t.n_chunks for t in plan.tensors)}


def _unit(plan: Plan, key: tuple, length: int, checksum: int) -> WriteUnit:
    """The journal entry of a finished write task, from its key ``(name, t, c)``."""
    _, t, c = key
    tp = plan.tensors[t]
    offset = tp.offset + tp.chunk_rows(c)[0] * tp.row_bytes
    return WriteUnit(t, c, tp.name, plan.shards[tp.shard].name, offset, length, checksum)


def verified_units(plan: Plan, output: LocalOutput, units: list[WriteUnit]) -> list[WriteUnit]:
    """The journaled units that are really done: planned as the journal says (same
    tensor, shard, offset and length) and whose bytes in the ``.partial`` shard have the
    journaled checksum. The rest are written again. Reading back costs one read of
    what was written; it catches writes lost in a crash (the journal may outlive data
    that was never flushed) and shards changed since."""
    from concurrent.futures import ThreadPoolExecutor

    def planned(u: WriteUnit) -> bool:
        if not (0 <= u.t < len(plan.tensors)):
            return False
        tp = plan.tensors[u.t]
        if not (0 <= u.c < tp.n_chunks):
            return False
        r0, r1 = tp.chunk_rows(u.c)
        return (u.tensor == tp.name and u.shard == plan.shards[tp.shard].name
                and u.offset == tp.offset + r0 * tp.row_bytes and u.length == (r1 - r0) * tp.row_bytes)

    def intact(u: WriteUnit) -> bool:
        try:
            return checksum_range(output.shard_path(u.shard), u.offset, u.length) == u.crc32
        except OSError:
            return False

    candidates = [u for u in units if planned(u)]
    # zlib.crc32 and pread release the GIL: a few threads read several shards at once
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        ok = list(pool.map(intact, candidates))
    return [u for u, good in zip(candidates, ok) if good]


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def finish_output(plan: Plan, output: LocalOutput, *, copy_tokenizer: bool, write_model_card: bool,
                  reports: dict | None = None) -> None:
    """config.json, tokenizer, recipe, model card, reports (a MoE's routing report), and
    finally the index."""
    from dmerge.recipe import INTERNAL_FIELDS

    recipe = plan.recipe
    output.write_json("config.json", plan.out_config)
    for name, doc in (reports or {}).items():
        output.write_json(name, doc)
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
    own = getattr(recipe, "tokenizer_ref", None)  # a MoE recipe names the model whose tokenizer it uses
    if own in plan.models:
        return own
    if recipe.base_model in plan.models:
        return recipe.base_model
    return next(iter(plan.models), None)


def describe_result(result: RunResult) -> str:
    rate = result.bytes_read / result.seconds if result.seconds else 0
    resumed = (f"; resumed: {result.units_resumed} of {result.units} write units were done"
               if result.units_resumed is not None else "")
    peaks = list((result.peak_memory or {}).values())
    memory = (f", peak worker memory {format_bytes(max(peaks))}" + (f" on the busiest of {len(peaks)} workers" if len(peaks) > 1 else "")
              if peaks else "")
    if result.reruns:
        memory += f", {result.reruns} task{'s' if result.reruns != 1 else ''} rerun"
    return (f"wrote {result.out_dir}: {format_bytes(result.bytes_written)} in {result.seconds:.1f} s{memory} "
            f"({format_bytes(result.bytes_read)} read, {format_bytes(rate)}/s, {result.n_tasks} tasks{resumed})")


__all__ = ["ClusterOptions", "RunResult", "run_plan", "describe_result", "dask_client"]
