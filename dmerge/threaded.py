"""Run a merge's graph on a pool of threads in this process: no cluster to start.

A merge that fits one machine and asks for no cluster (no ``--scheduler``,
``--workers`` or ``--processes``) needs none of what a Dask cluster gives: no
scheduler to take in the graph, no worker to register, no comm. Starting an in-process
``LocalCluster`` (and importing distributed) cost about a second before the first task
ran; here the first tasks start as soon as the graph is built.

The tasks are the graph's own (:func:`dmerge.graph.build_graph`), called with the same
arguments, so the output bytes are those of a cluster run. The executor keeps exactly
``threads`` tasks running, takes ready tasks in graph order (tensor by tensor, as the
cluster path's waves do) so that the statistics a tensor's writes wait for are done
first, and drops a reduction's value once every task that needs it has finished.

The caller's loop stays in charge: results come back through ``on_result`` on the
calling thread, and ``poll`` (e.g. a check for a noted Ctrl-C) runs between short waits.
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from dmerge.worker_env import set_process_memory_limit, torch_threads_for


def _dependencies(task: tuple, dsk: dict) -> list:
    """The keys of ``dsk`` a task's arguments name: a key, or keys inside (nested) lists,
    as Dask reads a graph."""
    deps = []

    def visit(arg) -> None:
        if isinstance(arg, tuple) and arg in dsk:
            deps.append(arg)
        elif isinstance(arg, list):
            for a in arg:
                visit(a)

    for arg in task[1:]:
        visit(arg)
    return list(dict.fromkeys(deps))  # once each, however often the task names it


def _argument(arg: Any, results: dict) -> Any:
    """An argument with the keys it names replaced by their values."""
    if isinstance(arg, tuple) and arg in results:
        return results[arg]
    if isinstance(arg, list):
        return [_argument(a, results) for a in arg]
    return arg


def _call(task: tuple, args: list) -> Any:
    return task[0](*args)


def local_memory_limit(value: str | int | None) -> int | None:
    """Bytes the merge may hold in this process, from ``--memory-limit``: ``auto`` (the
    machine's memory, or the container's limit where lower), a fraction of the
    machine's memory (a number up to 1), or bytes; None for no limit."""
    total = _physical_memory()
    if value in (None, "", "auto"):
        return _container_limit(total)
    number = float(value)
    if number <= 0:
        return None
    return int(number * total) if number <= 1 else int(number)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _container_limit(total: int) -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total or None


def run_graph(dsk: dict, keys: list, *, threads: int, on_result: Callable[[Any, Any], None],
              poll: Callable[[], None] = lambda: None, retries: int = 0, memory_limit: int | None = None) -> int:
    """Compute ``dsk`` on ``threads`` threads; ``on_result(key, value)`` for each of
    ``keys`` as it finishes, on this thread. Returns how many tasks were run again
    after raising (at most ``retries`` more tries each); a task that still fails
    stops the run and its exception is raised here. An exception from ``on_result``
    or ``poll`` (an interruption) stops the run too: tasks not started are dropped,
    those running are waited for."""
    import torch

    # as the cluster's worker plugin does: threads x torch threads = cores
    torch.set_num_threads(torch_threads_for(threads))
    set_process_memory_limit(memory_limit)
    order = {key: i for i, key in enumerate(dsk)}
    deps = {key: _dependencies(task, dsk) for key, task in dsk.items()}
    waiting = {key: len(d) for key, d in deps.items()}
    dependents: dict = {}
    for key, d in deps.items():
        for dep in d:
            dependents.setdefault(dep, []).append(key)
    wanted = set(keys)
    users_left = {key: len(dependents.get(key, ())) for key in dsk}
    ready = [(order[key], key) for key, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    results: dict = {}
    running: dict[Future, Any] = {}
    tries: dict = {}
    reruns = 0

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dmerge-task")
    try:
        def submit(key) -> None:
            task = dsk[key]
            args = [_argument(a, results) for a in task[1:]]
            running[pool.submit(_call, task, args)] = key

        while ready or running:
            while ready and len(running) < threads:
                submit(heapq.heappop(ready)[1])
            done, _ = wait(running, timeout=0.05, return_when=FIRST_COMPLETED)
            poll()
            for fut in done:
                key = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    tries[key] = tries.get(key, 0) + 1
                    if tries[key] > retries:
                        raise exc
                    reruns += 1
                    submit(key)
                    continue
                value = fut.result()
                for dep in deps[key]:  # a reduction no task needs any more is dropped
                    users_left[dep] -= 1
                    if users_left[dep] == 0 and dep not in wanted:
                        results.pop(dep, None)
                if key in wanted:
                    on_result(key, value)
                if dependents.get(key):
                    results[key] = value
                    for user in dependents[key]:
                        waiting[user] -= 1
                        if waiting[user] == 0:
                            heapq.heappush(ready, (order[user], user))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return reruns


__all__ = ["run_graph", "local_memory_limit"]
