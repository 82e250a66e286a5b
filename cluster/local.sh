#!/usr/bin/env bash
# Start a Dask scheduler and N workers on this machine, run a merge on them, stop them.
#   cluster/local.sh RECIPE OUT_DIR [N_WORKERS] [THREADS] [MEMORY_LIMIT]
set -euo pipefail
recipe=$1; out=$2; n=${3:-2}; threads=${4:-1}; mem=${5:-2GB}
port=${DMERGE_SCHEDULER_PORT:-8786}
dask scheduler --host 127.0.0.1 --port "$port" --dashboard-address 127.0.0.1:8787 &
sched=$!
trap 'kill $sched $workers 2>/dev/null || true' EXIT
sleep 2
dask worker "tcp://127.0.0.1:$port" --nworkers "$n" --nthreads "$threads" --memory-limit "$mem" &
workers=$!
sleep 3
dmerge run "$recipe" "$out" --scheduler "tcp://127.0.0.1:$port"
