#!/usr/bin/env bash
# A Dask scheduler and N workers on this machine, one merge run on them, then everything stopped.
#
#   cluster/local.sh RECIPE OUT_DIR [dmerge run options...]
#
# Options after OUT_DIR go to `dmerge run` as they are (--resume, --out-shard-size 2G, ...).
# The script exits with dmerge's exit status (143 after SIGTERM: continue with --resume).
#
# Environment (defaults in brackets):
#   DMERGE_WORKERS         worker processes [2]
#   DMERGE_THREADS         threads per worker [1]
#   DMERGE_MEMORY_LIMIT    memory limit per worker, as `dask worker --memory-limit` [2GB]
#   DMERGE_HOST            address to listen on [127.0.0.1]
#   DMERGE_SCHEDULER_PORT  scheduler port [8786]
#   DMERGE_DASHBOARD_PORT  scheduler dashboard port, or `none` for no dashboard [8787]
#   DMERGE_NO_NANNY        1: bare workers (`--no-nanny`), no nanny process per worker [0]
#   DMERGE_START_TIMEOUT   seconds to wait for the scheduler and all workers [120]
#   DMERGE_PYTHON          the interpreter with dmerge and distributed installed [python3]
#   DMERGE_LOG_DIR         where scheduler/worker logs go [a temporary folder, removed on success]
set -uo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
recipe=$1; out=$2; shift 2

n=${DMERGE_WORKERS:-2}
threads=${DMERGE_THREADS:-1}
mem=${DMERGE_MEMORY_LIMIT:-2GB}
host=${DMERGE_HOST:-127.0.0.1}
port=${DMERGE_SCHEDULER_PORT:-8786}
dport=${DMERGE_DASHBOARD_PORT:-8787}
timeout=${DMERGE_START_TIMEOUT:-120}
py=${DMERGE_PYTHON:-$(command -v python3 || command -v python)}
address="tcp://$host:$port"

if [[ -n ${DMERGE_LOG_DIR:-} ]]; then
    logs=$DMERGE_LOG_DIR; keep_logs=1; mkdir -p "$logs"
else
    logs=$(mktemp -d "${TMPDIR:-/tmp}/dmerge-local.XXXXXX"); keep_logs=0
fi

# Each Dask process gets its own process group (setsid, where there is one), so stopping it
# also stops a nanny's worker child, and Ctrl-C in the terminal reaches only dmerge.
detach=()
command -v setsid >/dev/null 2>&1 && detach=(setsid)
pids=()
merge=""

stop_cluster() {
    local pid i
    for pid in "${pids[@]}"; do
        if [[ ${#detach[@]} -gt 0 ]]; then kill -TERM -- "-$pid" 2>/dev/null; else kill -TERM "$pid" 2>/dev/null; fi
    done
    for i in $(seq 1 100); do   # up to 10 s for a clean shutdown, then SIGKILL
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if [[ ${#detach[@]} -gt 0 ]]; then kill -KILL -- "-$pid" 2>/dev/null; else kill -KILL "$pid" 2>/dev/null; fi
        wait "$pid" 2>/dev/null
    done
    pids=()
}
on_exit() {
    local rc=$?
    stop_cluster
    if [[ $rc -eq 0 && $keep_logs -eq 0 ]]; then rm -rf "$logs"; else echo "local.sh: scheduler and worker logs in $logs" >&2; fi
}
on_signal() {
    # While the merge runs, pass the signal on as SIGTERM: dmerge stops cleanly, leaves the output
    # folder resumable and exits 143; the status is then ours. Before that, just stop.
    if [[ -n $merge ]]; then kill -TERM "$merge" 2>/dev/null; else exit 143; fi
}
trap on_exit EXIT
trap on_signal INT TERM

dashboard=(--no-dashboard)
[[ $dport != none ]] && dashboard=(--dashboard-address "$host:$dport")
"${detach[@]}" "$py" -m distributed.cli.dask_scheduler --host "$host" --port "$port" "${dashboard[@]}" \
    >"$logs/scheduler.log" 2>&1 &
pids+=($!)

nanny=()
[[ ${DMERGE_NO_NANNY:-0} == 1 ]] && nanny=(--no-nanny)
for i in $(seq 1 "$n"); do
    "${detach[@]}" "$py" -m distributed.cli.dask_worker "$address" --host "$host" --name "local-$i" \
        --nthreads "$threads" --memory-limit "$mem" --no-dashboard "${nanny[@]}" \
        >"$logs/worker-$i.log" 2>&1 &
    pids+=($!)
done

# Poll until the scheduler answers and all workers have registered; give up early if one of
# the processes died (a port in use, a bad option).
if ! "$py" - "$address" "$n" "$timeout" "${pids[@]}" <<'EOF'
import asyncio, os, sys, time
from distributed import Client
address, n, timeout, pids = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), [int(p) for p in sys.argv[4:]]
deadline = time.monotonic() + timeout
def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie not yet reaped by the shell is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
async def workers():
    async with Client(address, asynchronous=True, timeout="5s") as c:
        return len(await c.nthreads())
while True:
    dead = [p for p in pids if not alive(p)]
    if dead:
        sys.exit(f"local.sh: a Dask process exited while starting (pid {dead[0]})")
    try:  # bounded: something else listening on the port may accept and never answer
        if asyncio.run(asyncio.wait_for(workers(), 10)) >= n:
            sys.exit(0)
    except (OSError, asyncio.TimeoutError):
        pass
    if time.monotonic() > deadline:
        sys.exit(f"local.sh: {n} workers did not join {address} within {timeout:g} s")
    time.sleep(0.3)
EOF
then
    for f in "$logs"/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
    exit 1
fi

"$py" -c 'import sys; from dmerge.cli import main; sys.argv[0] = "dmerge"; main()' \
    run "$recipe" "$out" --scheduler "$address" "$@" &
merge=$!
wait "$merge"; rc=$?
while kill -0 "$merge" 2>/dev/null; do   # wait returned for a trapped signal: wait again
    wait "$merge"; rc=$?
done
merge=""
exit "$rc"
