"""cluster/: the local script runs a real merge on real scheduler and worker processes and
leaves none behind; the Docker, Compose, Kubernetes and SLURM recipes parse, use the image
the Dockerfile builds, and run commands (and options) that exist in it."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from dask.utils import parse_bytes

from conftest import _free_port, run_merge, shard_bytes, write_recipe

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"

RECIPE = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: -0.2}}
dtype: bfloat16
"""


# ---------------------------------------------------------------------------------------
# cluster/local.sh, run for real


def _marked_processes(mark: str) -> list[int]:
    """Processes (scheduler, nannies, workers and their children, dmerge) started with
    DMERGE_TEST_MARK=mark in their environment: every descendant of one local.sh run."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"DMERGE_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _local_sh(args: list[str], port: int, mark: str, **env) -> subprocess.Popen:
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DMERGE_PYTHON": sys.executable,
        "DMERGE_SCHEDULER_PORT": str(port),
        "DMERGE_DASHBOARD_PORT": "none",
        "DMERGE_WORKERS": "2",
        "DMERGE_THREADS": "1",
        "DMERGE_MEMORY_LIMIT": "1GB",
        "DMERGE_START_TIMEOUT": "90",
        "DMERGE_TEST_MARK": mark,
        "DMERGE_LOG_DIR": str(Path(args[1]).parent / "logs"),  # kept after a failure: not in /tmp
        **env,
    }
    return subprocess.Popen(["bash", str(CLUSTER / "local.sh"), *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, mark: str, timeout: float = 150) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in _marked_processes(mark):
            os.kill(pid, signal.SIGKILL)
        pytest.fail("cluster/local.sh did not finish in time")
    deadline = time.time() + 5  # the script waits for its processes; allow for reaping
    while _marked_processes(mark) and time.time() < deadline:
        time.sleep(0.1)
    left = _marked_processes(mark)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"cluster/local.sh left processes behind: {left}"
    return proc.returncode, out + err


@pytest.mark.parametrize("no_nanny", ["0", "1"], ids=["nanny", "bare-workers"])
def test_local_script_merges_like_a_local_run(family, tmp_path, no_nanny):
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    run_merge(recipe, str(tmp_path / "local"), "--out-shard-size", "100K")
    mark = uuid.uuid4().hex
    proc = _local_sh([recipe, str(tmp_path / "cluster"), "--quiet", "--out-shard-size", "100K"],
                     _free_port(), mark, DMERGE_NO_NANNY=no_nanny)
    rc, output = _finish(proc, mark)
    assert rc == 0, output
    expected = shard_bytes(str(tmp_path / "local"))
    assert len(expected) > 1  # the passed-through --out-shard-size took effect
    assert shard_bytes(str(tmp_path / "cluster")) == expected
    assert (tmp_path / "cluster" / "model.safetensors.index.json").exists()


def test_local_script_exits_with_dmerges_status(tmp_path):
    mark = uuid.uuid4().hex
    proc = _local_sh([str(tmp_path / "missing.yml"), str(tmp_path / "out"), "--quiet"], _free_port(), mark)
    rc, output = _finish(proc, mark)
    assert rc == 1, output
    assert "missing.yml" in output


def test_local_script_stops_everything_on_sigterm(family, tmp_path):
    """SIGTERM while starting (or, had start-up been quick, while merging: dmerge then exits
    143 as well): exit 143, nothing left running."""
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    mark = uuid.uuid4().hex
    proc = _local_sh([recipe, str(tmp_path / "out"), "--quiet"], _free_port(), mark)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rc, output = _finish(proc, mark)
    assert rc == 143, output


def test_local_script_fails_fast_when_the_port_is_taken(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", RECIPE.format(**family))
    mark = uuid.uuid4().hex
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        start = time.time()
        proc = _local_sh([recipe, str(tmp_path / "out"), "--quiet"], taken.getsockname()[1], mark)
        rc, output = _finish(proc, mark)
    assert rc != 0
    assert time.time() - start < 60, "waited for the start timeout instead of seeing the scheduler exit"
    assert "exited while starting" in output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Commands in the recipes: programs the image has, options those programs accept


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


IMAGE = f"dmerge:{_version()}"


def check_command(argv: list[str]) -> None:
    """argv runs in the image: `dask scheduler|worker ...`, `dmerge SUBCOMMAND ...` or
    `python -c CODE`, and its options parse (click's own parser, nothing run)."""
    assert argv, "empty command"
    prog, rest = argv[0], list(argv[1:])
    if prog == "dask":
        assert any(e.name == "dask" for e in entry_points(group="console_scripts")), "no `dask` program"
        subcommands = {e.name: e for e in entry_points(group="dask_cli")}
        assert rest and rest[0] in subcommands, f"`dask {rest[:1]}` is not a dask subcommand"
        command = subcommands[rest[0]].load()
        command.make_context(f"dask {rest[0]}", rest[1:])
    elif prog == "dmerge":
        from dmerge.cli import main

        assert rest and rest[0] in main.commands, f"`dmerge {rest[:1]}` is not a dmerge subcommand"
        main.commands[rest[0]].make_context(f"dmerge {rest[0]}", rest[1:])
    elif prog in ("python", "python3"):
        assert rest[0] == "-c", argv
        compile(rest[1], "<python -c>", "exec")
    else:
        pytest.fail(f"{prog!r} is not a program the image provides")


def _opt(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_dockerfile_builds_what_the_recipes_use():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # CPU torch, no CUDA wheels
    assert re.search(r"apt-get install .*\bgcc\b", text)  # the fused kernels
    assert re.search(r"pip install .*/opt/dmerge", text)
    for line in re.findall(r"^COPY (.+)$", text, re.M):  # what it copies is in the repository
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
    # The documented build command tags the image with dmerge's version.
    assert f"docker build -f cluster/Dockerfile -t {IMAGE} ." in text
    assert f"docker build -f cluster/Dockerfile -t {IMAGE} ." in (CLUSTER / "README.md").read_text()


def test_compose_file():
    compose = yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"scheduler", "worker", "merge"} <= set(services)
    for name, service in services.items():
        assert service["image"] == IMAGE, name
        build = service["build"]
        assert (CLUSTER / build["context"] / build["dockerfile"]).resolve() == CLUSTER / "Dockerfile"
        check_command(service["command"])
    scheduler, worker, merge = services["scheduler"], services["worker"], services["merge"]
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert "healthcheck" in scheduler
    check_command(scheduler["healthcheck"]["test"][1:])
    assert _opt(scheduler["command"], "--port") == "8786"
    assert worker["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert worker["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert "replicas" not in worker.get("deploy", {})  # scaled with --scale worker=N
    limit = parse_bytes(_opt(worker["command"], "--memory-limit"))
    assert limit < parse_bytes(worker["deploy"]["resources"]["limits"]["memory"])
    assert merge["command"][:2] == ["dmerge", "run"]
    assert _opt(merge["command"], "--scheduler") == "tcp://scheduler:8786"
    # workers and the client see the same folder at the same path, and the output is in it
    assert worker["volumes"] == merge["volumes"]
    mount = worker["volumes"][0].rsplit(":", 1)[1]
    assert merge["command"][3].startswith(mount + "/")


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _pod_specs(docs: list[dict]) -> list[dict]:
    specs = []
    for d in docs:
        if d["kind"] == "DaskCluster":
            specs += [d["spec"]["worker"]["spec"], d["spec"]["scheduler"]["spec"]]
        elif d["kind"] in ("Deployment", "Job"):
            specs.append(d["spec"]["template"]["spec"])
    return specs


def _argv(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _mounts(pod_spec: dict, container: dict) -> dict[str, str]:
    """claim name -> mount path for a container's volumes."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {claims[m["name"]]: m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims}


def _check_job(job: dict, scheduler: str, workers: int, worker_mounts: dict[str, str]) -> None:
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (runner,) = pod["containers"]
    argv = _argv(runner)
    assert argv[:2] == ["dmerge", "run"]
    assert _opt(argv, "--scheduler") == scheduler
    assert "--resume" in argv  # a retried Job continues the merge
    mounts = _mounts(pod, runner)
    assert mounts and mounts == worker_mounts  # same claim at the same path as the workers
    path = next(iter(mounts.values()))
    assert argv[2].startswith(path + "/") and argv[3].startswith(path + "/")  # recipe and output
    (wait,) = pod["initContainers"]  # dmerge sizes tasks from the workers present: wait for all
    code = _argv(wait)[2]
    assert scheduler in code and f"wait_for_workers({workers}," in code


def test_kubernetes_operator_manifest():
    docs = _documents("kubernetes.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "DaskCluster", "Job"}
    pvc, cluster = kinds["PersistentVolumeClaim"], kinds["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    name = cluster["metadata"]["name"]
    address = f"tcp://{name}-scheduler:8786"  # the Service the operator creates

    worker_group = cluster["spec"]["worker"]
    assert isinstance(worker_group["replicas"], int) and worker_group["replicas"] >= 1
    worker_pod = worker_group["spec"]
    (worker,) = worker_pod["containers"]
    args = _argv(worker)
    assert args[:2] == ["dask", "worker"]
    assert _opt(args, "--name") == "$(DASK_WORKER_NAME)"
    for option in ("--dashboard-address", "--nthreads", "--memory-limit"):
        _opt(args, option)
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    assert env["DASK_SCHEDULER_ADDRESS"] == address
    assert parse_bytes(_opt(args, "--memory-limit")) < parse_bytes(worker["resources"]["limits"]["memory"])
    worker_mounts = _mounts(worker_pod, worker)
    assert worker_mounts == {pvc["metadata"]["name"]: "/work"}

    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert _argv(scheduler)[:2] == ["dask", "scheduler"]
    port_names = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    service = cluster["spec"]["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    ports = {p["port"]: p["targetPort"] for p in service["ports"]}
    assert set(ports) == {8786, 8787}
    assert port_names[ports[8786]] == 8786 and port_names[ports[8787]] == 8787
    assert _opt(_argv(scheduler), "--port") == "8786"

    _check_job(kinds["Job"], address, worker_group["replicas"], worker_mounts)


def test_kubernetes_deployments_manifest():
    docs = _documents("kubernetes-deployments.yaml")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Deployment", "Job", "PersistentVolumeClaim", "Service"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    (service,) = [d for d in docs if d["kind"] == "Service"]
    scheduler = deployments["dmerge-scheduler"]
    assert service["spec"]["selector"] == scheduler["spec"]["template"]["metadata"]["labels"]
    address = f"tcp://{service['metadata']['name']}:8786"
    worker_deployment = deployments["dmerge-worker"]
    worker_pod = worker_deployment["spec"]["template"]["spec"]
    (worker,) = worker_pod["containers"]
    assert _argv(worker)[:3] == ["dask", "worker", address]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    _check_job(job, address, worker_deployment["spec"]["replicas"], _mounts(worker_pod, worker))


@pytest.mark.parametrize("name", ["kubernetes.yaml", "kubernetes-deployments.yaml"])
def test_kubernetes_containers_run_the_image_and_real_commands(name):
    for pod in _pod_specs(_documents(name)):
        for container in _containers(pod):
            assert container["image"] == IMAGE, container["name"]
            check_command(_argv(container))


# ---------------------------------------------------------------------------------------
# Shell scripts and the SLURM launchers


@pytest.mark.parametrize("script", ["local.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _shell_commands(text: str, program: str) -> list[list[str]]:
    """The `program ...` command lines of a shell script (continuations joined, shell
    variables replaced by a placeholder, redirections and `&` dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("#") or program not in line:
            continue
        tokens = shlex.split(line.split(" &")[0], comments=True)
        if program.split()[0] not in tokens:
            continue
        tokens = tokens[tokens.index(program.split()[0]):]
        if tokens[:len(program.split())] != program.split():
            continue
        commands.append([t for t in ("1" if t.startswith("$") else t for t in tokens if t != "$@")])
    return commands


def test_sbatch_script():
    text = (CLUSTER / "slurm.sbatch").read_text()
    lines = text.splitlines()
    first_command = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    directives = [l for l in lines[:first_command] if l.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only before the first command
    assert not [l for l in lines[first_command:] if l.startswith("#SBATCH")]
    signal_directive = [l for l in directives if l.startswith("#SBATCH --signal=")]
    assert signal_directive, "no --signal directive: SLURM would kill dmerge at the time limit"
    sig, seconds = re.fullmatch(r"#SBATCH --signal=B:(\w+)@(\d+)", signal_directive[0]).groups()
    assert sig == "TERM" and int(seconds) >= 60
    (scheduler,) = _shell_commands(text, "dask scheduler")
    (worker,) = _shell_commands(text, "dask worker")
    (merge,) = _shell_commands(text, "dmerge run")
    for argv in (scheduler, worker, merge):
        check_command(argv)
    assert "srun" in re.sub(r"\\\n\s*", " ", text).split("dask worker")[0].splitlines()[-1]
    assert _opt(worker, "--scheduler-file") and _opt(scheduler, "--scheduler-file")
    assert "--scheduler" in merge and "--resume" in merge


def test_jobqueue_launcher_compiles_and_explains_a_missing_dask_jobqueue(tmp_path):
    launcher = CLUSTER / "slurm_jobqueue.py"
    subprocess.run([sys.executable, "-m", "py_compile", str(launcher)], check=True,
                   env={**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path)})
    text = launcher.read_text()
    assert "SLURMCluster(" in text and "job_extra_directives=" in text and "scale(jobs=" in text
    assert '"--scheduler", cluster.scheduler_address' in text
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        done = subprocess.run([sys.executable, str(launcher), "r.yml", "out"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 2
        assert "pip install dask-jobqueue" in done.stderr


def test_jobqueue_launcher_options_reach_slurm():
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    sys.path.insert(0, str(CLUSTER))
    try:
        import slurm_jobqueue
    finally:
        sys.path.remove(str(CLUSTER))
    args, extra = slurm_jobqueue.parse_args(["r.yml", "out", "--jobs", "2", "--cores", "4", "--memory", "8GB",
                                             "--job-extra=--exclusive", "--resume", "--out-shard-size", "1G"])
    assert extra == ["--resume", "--out-shard-size", "1G"]
    with dask_jobqueue.SLURMCluster(cores=args.cores, processes=args.processes, memory=args.memory,
                                    walltime=args.walltime, job_extra_directives=args.job_extra) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --exclusive" in script and "--nthreads 4" in script
