"""The Dask worker plugin that sets up each worker for dmerge's tasks (see
:mod:`dmerge.worker_env`). Kept apart from that module because it imports distributed,
which a merge without a cluster never needs."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from dmerge.worker_env import register_sizeof, torch_threads_for


class WorkerSetup(WorkerPlugin):
    """Sets torch's thread count on each worker, lets Dask's memory accounting see
    tensors (see :mod:`dmerge.worker_env`), and sets the run's storage options
    (credentials, endpoints: fsspec defaults per protocol).

    ``threads_by_host``: task threads per host when the merge started; a worker on a host
    not listed counts its own threads only. The storage options travel inside the
    plugin, never in a task, so they do not show on the dashboard or in the graph.
    """

    name = "dmerge-worker-setup"

    def __init__(self, threads_by_host: dict[str, int], storage_options: dict | None = None):
        self.threads_by_host = dict(threads_by_host)
        self.storage_options = dict(storage_options or {})

    def setup(self, worker) -> None:
        import torch

        from distributed.comm import get_address_host

        host = get_address_host(worker.address)  # as the scheduler names it (tcp and in-process)
        threads = max(self.threads_by_host.get(host, 0), worker.state.nthreads)
        torch.set_num_threads(torch_threads_for(threads))
        register_sizeof()
        if self.storage_options:
            from dmerge.io.storage import configure

            configure(self.storage_options)


__all__ = ["WorkerSetup"]
