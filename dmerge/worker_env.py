"""What a Dask worker needs to run dmerge's tasks well, however it was started.

Workers started bare (``dask worker --no-nanny``, containers, SLURM) get none of the
environment a nanny sets, and nanny workers get ``OMP_NUM_THREADS=1``. Neither is what
a merge wants, so dmerge sets up each worker itself:

* **torch threads** from the worker's own share of its host's cores: a host running
  ``T`` task threads in all (every worker there) on ``C`` cores gives torch
  ``max(1, C // T)`` threads per task thread, so tasks never oversubscribe the cores;
* **memory**: after each task, free heap pages go back to the system once the process
  passes half its memory limit (:mod:`dmerge.allocator`), and Dask's memory accounting
  (``sizeof``) sees what tensors and statistic results really hold.

:class:`dmerge.worker_plugin.WorkerSetup` is a Dask worker plugin: registered by the
client, it runs on every worker, including those that join or restart after the merge
has started. This module imports neither torch nor distributed at import time: tasks
import it, and tasks also run without a cluster (:mod:`dmerge.threaded`).
"""

from __future__ import annotations

import os
import sys
import threading

from dmerge.allocator import release_if_above


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def torch_threads_for(host_task_threads: int, cores: int | None = None) -> int:
    """Torch threads per task thread on a host running ``host_task_threads`` in all."""
    return max(1, (cores or usable_cores()) // max(1, host_task_threads))


def host_task_threads(workers: dict) -> dict[str, int]:
    """Task threads per host, from ``Client.scheduler_info()["workers"]``."""
    totals: dict[str, int] = {}
    for info in workers.values():
        host = info.get("host", "")
        totals[host] = totals.get(host, 0) + int(info.get("nthreads", 1))
    return totals


_limit = threading.local()
_process_limit: int | None = None  # a merge without a cluster: this process's limit


def set_process_memory_limit(limit: int | None) -> None:
    """The memory limit of tasks run outside a Dask worker (:mod:`dmerge.threaded`)."""
    global _process_limit
    _process_limit = limit


def _worker_memory_limit() -> int | None:
    """The memory limit of the worker running this thread; outside a worker, the
    process's (:func:`set_process_memory_limit`)."""
    if "distributed" in sys.modules:  # never imported just to learn there is no worker
        try:
            from distributed import get_worker

            return get_worker().memory_manager.memory_limit
        except (ImportError, ValueError, AttributeError):
            pass
    return _process_limit


def after_task() -> None:
    """Run after every task: hand memory back when the worker's limit needs it."""
    limit = getattr(_limit, "value", 0)
    if limit == 0:  # not looked up yet on this thread
        limit = _limit.value = _worker_memory_limit()
    release_if_above(limit)


def register_sizeof() -> None:
    """Let Dask's memory accounting see tensor bytes (it counts a torch tensor as ~80
    bytes otherwise), and the tensors inside statistic results."""
    import torch
    from dask.sizeof import sizeof

    from dmerge.tasks import Reduction

    @sizeof.register(torch.Tensor)
    def _tensor(t):
        return t.element_size() * t.nelement() + 64

    @sizeof.register(Reduction)
    def _reduction(r):
        return sizeof(r.value) + 64


__all__ = ["after_task", "register_sizeof", "torch_threads_for", "host_task_threads", "usable_cores"]
