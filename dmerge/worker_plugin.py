"""The Dask worker plugin that sets up each worker for dmerge's tasks (see
:mod:`dmerge.worker_env`). Kept apart from that module because it imports distributed,
which a merge without a cluster never needs."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from dmerge.worker_env import register_sizeof, torch_threads_for


class WorkerSetup(WorkerPlugin):
    """Sets torch's thread count on each worker and lets Dask's memory accounting see
    tensors (see :mod:`dmerge.worker_env`).

    ``threads_by_host``: task threads per host when the merge started; a worker on a host
    not listed counts its own threads only.
    """

    name = "dmerge-worker-setup"

    def __init__(self, threads_by_host: dict[str, int]):
        self.threads_by_host = dict(threads_by_host)

    def setup(self, worker) -> None:
        import torch

        from distributed.comm import get_address_host

        host = get_address_host(worker.address)  # as the scheduler names it (tcp and in-process)
        threads = max(self.threads_by_host.get(host, 0), worker.state.nthreads)
        torch.set_num_threads(torch_threads_for(threads))
        register_sizeof()


__all__ = ["WorkerSetup"]
