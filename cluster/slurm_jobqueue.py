#!/usr/bin/env python3
"""dmerge on SLURM through dask-jobqueue: the scheduler runs here (a login node, or a small
job of its own), workers run as SLURM jobs, one merge runs on them, then the jobs are cancelled.

    pip install dask-jobqueue          # not a dmerge dependency
    python cluster/slurm_jobqueue.py RECIPE /shared/out --jobs 4 --cores 8 --memory 16GB \\
        --walltime 04:00:00 [--queue Q] [--account A] [dmerge run options...]

Options this script does not know go to `dmerge run` (--resume, --out-shard-size 5G, ...).
Each job runs --processes workers sharing --cores and --memory; dmerge plans each task's
memory from the smallest worker's limit (memory / processes, minus dask-jobqueue's margin).
The output folder and the parents must be on a filesystem every node sees at the same path,
and the jobs must start the same Python environment (dask-jobqueue uses this interpreter).
Ctrl-C or SIGTERM stops the merge cleanly (continue it with --resume) and cancels the jobs.
Exits with dmerge's exit status.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("out")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes) to start [4]")
    p.add_argument("--cores", type=int, default=8, help="cores per job [8]")
    p.add_argument("--processes", type=int, default=1, help="worker processes per job [1]")
    p.add_argument("--memory", default="16GB", help="memory per job, shared by its workers [16GB]")
    p.add_argument("--walltime", default="04:00:00", help="time limit per job [04:00:00]")
    p.add_argument("--queue", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--job-extra", action="append", default=[],
                   help="extra #SBATCH directive for the worker jobs, e.g. --job-extra=--exclusive (repeatable)")
    p.add_argument("--start-timeout", type=float, default=None,
                   help="seconds to wait for all workers (queued jobs) before giving up [no limit]")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, dmerge_args = parse_args(argv)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("slurm_jobqueue.py needs dask-jobqueue, which dmerge does not install: "
              "pip install dask-jobqueue", file=sys.stderr)
        return 2
    from distributed import Client

    cluster = SLURMCluster(
        cores=args.cores,
        processes=args.processes,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        job_extra_directives=args.job_extra,
        python=sys.executable,
        job_name="dmerge-worker",
    )
    child: subprocess.Popen | None = None

    def on_signal(signum, frame):
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # dmerge stops cleanly; we then close the cluster
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.scale(jobs=args.jobs)
        n = args.jobs * args.processes
        print(f"waiting for {n} workers (dashboard: {cluster.dashboard_link})", file=sys.stderr, flush=True)
        # dmerge sizes its tasks from the workers connected when it starts: wait for all of them.
        with Client(cluster) as client:
            client.wait_for_workers(n, timeout=args.start_timeout)
        cmd = [sys.executable, "-c", "import sys; from dmerge.cli import main; sys.argv[0] = 'dmerge'; main()",
               "run", args.recipe, args.out, "--scheduler", cluster.scheduler_address, *dmerge_args]
        child = subprocess.Popen(cmd)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue
    except KeyboardInterrupt:
        return 130
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
