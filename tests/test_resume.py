"""Resuming an interrupted merge: the journal, the unfinished folder, --resume."""

from __future__ import annotations

import json
import functools
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import SLOW_FS, run_merge, shard_bytes, write_recipe
from dmerge.cli import main
from dmerge.io.journal import JOURNAL_NAME, MARKER_NAME
from dmerge.units import parse_size

TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: {w2}, density: 0.7}}
dtype: bfloat16
"""


OPTIONS = ["--chunk-size", "4K", "--out-shard-size", "100K"]


def _units(out) -> list[dict]:
    with open(os.path.join(out, JOURNAL_NAME)) as f:
        lines = f.read().split("\n")[1:]
    return [json.loads(ln) for ln in lines if ln.strip()]


def _summary(stdout: str) -> dict:
    """The numbers of the `wrote ...` line: tasks, and for a resumed run the units done."""
    m = re.search(r"\(([^,]+) read, .*, (\d+) tasks(?:; resumed: (\d+) of (\d+) write units were done)?\)", stdout)
    assert m, stdout
    return {"read": parse_size(m[1].replace(" ", "")), "tasks": int(m[2]),
            "resumed": int(m[3]) if m[3] else None, "units": int(m[4]) if m[4] else None}


class SlowMerge:
    """A `dmerge run` subprocess over the slow filesystem."""

    def __init__(self, tmp_path, family, w2: float = 0.5):
        (tmp_path / "slowfs.py").write_text(SLOW_FS)
        slow = {k: f"slowfile://{v}" for k, v in family.items()}
        self.recipe = write_recipe(tmp_path / "slow.yml", TIES.format(w2=w2, **slow))
        self.out = str(tmp_path / "out")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path)] + sys.path)}

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-c", "import slowfs; from dmerge.cli import main; main()", "run", self.recipe,
                self.out, *OPTIONS, *extra]

    def interrupt(self, sig: int, after_units: int = 5, delay: float = 0.05) -> tuple[int, str]:
        """Start the merge (each ranged read ``delay`` s), wait until the journal holds
        ``after_units`` units, send ``sig``."""
        proc = subprocess.Popen(self.command(), env={**self.env, "SLOWFS_DELAY": str(delay)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 60
            journal = os.path.join(self.out, JOURNAL_NAME)
            while not (os.path.exists(journal) and len(_units(self.out)) >= after_units):
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.returncode, err

    def resume(self, *extra: str) -> subprocess.CompletedProcess:
        """Run to the end with --resume, the filesystem no longer slowed down."""
        return subprocess.run(self.command("--resume", *extra), env={**self.env, "SLOWFS_DELAY": "0"},
                              capture_output=True, text=True, timeout=120)


def _undisturbed(tmp_path, family, w2: float = 0.5) -> tuple[str, dict]:
    out = str(tmp_path / "undisturbed")
    recipe = write_recipe(tmp_path / "plain.yml", TIES.format(w2=w2, **family))
    result = CliRunner().invoke(main, ["run", recipe, out, *OPTIONS])
    assert result.exit_code == 0, result.output
    return out, _summary(result.stdout)


def _assert_unfinished(out: str) -> list[dict]:
    names = os.listdir(out)
    assert MARKER_NAME in names and JOURNAL_NAME in names, names
    assert "model.safetensors.index.json" not in names and not [n for n in names if n.endswith(".safetensors")]
    assert [n for n in names if n.endswith(".partial")]
    assert "--resume" in open(os.path.join(out, MARKER_NAME)).read()
    units = _units(out)
    assert units
    return units


def _assert_finished_like(out: str, reference: str) -> None:
    names = os.listdir(out)
    assert MARKER_NAME not in names and JOURNAL_NAME not in names and not [n for n in names if n.endswith(".partial")]
    a, b = shard_bytes(out), shard_bytes(reference)
    assert len(a) > 1 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_sigterm_leaves_an_unfinished_folder_that_resumes_to_the_same_bytes(family, tmp_path):
    merge = SlowMerge(tmp_path, family)
    code, err = merge.interrupt(signal.SIGTERM, after_units=100, delay=0.02)
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated") and "--resume" in last and merge.out in last, err
    journaled = _assert_unfinished(merge.out)

    resumed = merge.resume()
    assert resumed.returncode == 0, resumed.stderr
    reference, full = _undisturbed(tmp_path, family)
    _assert_finished_like(merge.out, reference)
    done = _summary(resumed.stdout)
    # every unit journaled before the signal was verified and not written again
    assert done["resumed"] >= len(journaled) and done["units"] > done["resumed"]
    assert done["tasks"] < full["tasks"] and done["read"] < full["read"], (done, full)
    print(f"\nSIGTERM after {len(journaled)} units: resume ran {done['tasks']} of {full['tasks']} tasks, read "
          f"{done['read']} of {full['read']} B; {done['resumed']} of {done['units']} write units were done")


def test_sigkill_mid_merge_resumes_to_the_same_bytes(family, tmp_path):
    merge = SlowMerge(tmp_path, family)
    code, _ = merge.interrupt(signal.SIGKILL, after_units=20)
    assert code == -signal.SIGKILL
    journaled = _assert_unfinished(merge.out)
    assert len(journaled) >= 20
    resumed = merge.resume()
    assert resumed.returncode == 0, resumed.stderr
    reference, full = _undisturbed(tmp_path, family)
    _assert_finished_like(merge.out, reference)
    assert _summary(resumed.stdout)["tasks"] < full["tasks"]


def _interrupt_in_process(monkeypatch, recipe: str, out: str, after_units: int = 10):
    """Run the merge in this process and raise KeyboardInterrupt (as Ctrl-C would) once the
    journal has recorded ``after_units`` units."""
    from dmerge.io import journal

    record = journal.Journal.record
    count = [0]

    def interrupting(self, unit):
        record(self, unit)
        count[0] += 1
        if count[0] == after_units:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(journal.Journal, "record", interrupting)
        result = CliRunner().invoke(main, ["run", recipe, out, "-q", *OPTIONS])
    assert result.exit_code == 130, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; ") and "--resume" in last, result.stderr
    return _assert_unfinished(out)


def test_a_changed_recipe_refuses_to_resume(family, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(w2=0.5, **family))
    out = str(tmp_path / "out")
    _interrupt_in_process(monkeypatch, recipe, out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    changed = write_recipe(tmp_path / "r.yml", TIES.format(w2=0.6, **family))
    result = CliRunner().invoke(main, ["run", changed, out, "-q", "--resume", *OPTIONS])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "planned differently" in result.stderr, result.stderr
    # other options count too
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", "--resume", "--chunk-size", "8K"])
    assert result.exit_code == 1 and "planned differently" in result.stderr, result.stderr
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_corrupted_unit_is_detected_and_written_again(family, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(w2=0.5, **family))
    out = str(tmp_path / "out")
    units = _interrupt_in_process(monkeypatch, recipe, out)
    bad = units[3]
    path = os.path.join(out, bad["shard"] + ".partial")
    with open(path, "r+b") as f:
        f.seek(bad["offset"] + bad["length"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = CliRunner().invoke(main, ["run", recipe, out, "--resume", *OPTIONS])
    assert result.exit_code == 0, result.output
    assert _summary(result.stdout)["resumed"] == len(units) - 1
    reference, _ = _undisturbed(tmp_path, family)
    _assert_finished_like(out, reference)


PASSTHROUGH = """
merge_method: passthrough
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 3]
  - sources:
      - model: {ft2}
        layer_range: [1, 4]
dtype: bfloat16
"""


def test_copied_units_resume_too(family, tmp_path, monkeypatch):
    """Tensors copied byte for byte (copy_file_range: the task checksums what landed in the shard)."""
    recipe = write_recipe(tmp_path / "r.yml", PASSTHROUGH.format(**family))
    out = str(tmp_path / "out")
    units = _interrupt_in_process(monkeypatch, recipe, out)
    path = os.path.join(out, units[0]["shard"] + ".partial")
    with open(path, "r+b") as f:  # the first unit's bytes zeroed, as if lost in a crash
        f.seek(units[0]["offset"])
        f.write(bytes(units[0]["length"]))
    result = CliRunner().invoke(main, ["run", recipe, out, "--resume", *OPTIONS])
    assert result.exit_code == 0, result.output
    assert _summary(result.stdout)["resumed"] == len(units) - 1
    reference = str(tmp_path / "undisturbed")
    run_merge(recipe, reference, *OPTIONS)
    _assert_finished_like(out, reference)


def test_an_unfinished_folder_needs_resume_or_overwrite(family, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(w2=0.5, **family))
    out = str(tmp_path / "out")
    _interrupt_in_process(monkeypatch, recipe, out)
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", *OPTIONS])
    assert result.exit_code == 1
    assert result.stderr == (f"error: an unfinished merge is in {out}; pass --resume to continue it "
                             "or --overwrite to start again\n")
    _assert_unfinished(out)
    result = CliRunner().invoke(main, ["run", recipe, out, *OPTIONS, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert _summary(result.stdout)["resumed"] is None
    reference, _ = _undisturbed(tmp_path, family)
    _assert_finished_like(out, reference)


def test_resume_without_a_journal(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(w2=0.5, **family))
    out = str(tmp_path / "out")
    run_merge(recipe, out, "--resume", *OPTIONS)  # nothing there: a fresh start
    assert "model.safetensors.index.json" in os.listdir(out)
    result = CliRunner().invoke(main, ["run", recipe, out, "-q", "--resume", *OPTIONS])
    assert result.exit_code == 1 and "finished merge" in result.stderr and result.stderr.count("\n") == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["run", recipe, str(other), "-q", "--resume", *OPTIONS])
    assert result.exit_code == 1 and "no unfinished dmerge merge" in result.stderr, result.stderr
    assert os.listdir(other) == ["notes.txt"]


def test_failures_other_than_interruptions_remove_what_was_written(family, tmp_path):
    # weights so large that float16 overflows: the merge fails in its tasks, mid-run
    bad = write_recipe(tmp_path / "bad.yml", TIES.format(w2=1e6, **family)
                       .replace("dtype: bfloat16", "dtype: float16\nparameters: {normalize: false}"))
    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["run", bad, out, "-q", *OPTIONS])
    assert result.exit_code == 1 and "NaN/Inf" in result.stderr, result.output
    assert not os.path.exists(out)


@pytest.mark.parametrize("given, kept", [(["-q"], "--quiet"), (["--workers", "2", "-v"], "--workers 2 --verbose"),
                                         (["--no-copy-tokenizer"], "--no-copy-tokenizer")])
def test_the_resume_command_keeps_the_options_given(family, tmp_path, monkeypatch, given, kept):
    seen = []
    monkeypatch.setattr("dmerge.execute.run_plan", lambda *a, **k: seen.append(k["resume_command"]))
    monkeypatch.setattr("dmerge.execute.describe_result", lambda r: "")
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(w2=0.5, **family))
    result = CliRunner().invoke(main, ["run", recipe, "some out", *given, "--chunk-size", "4K", "--debug"])
    assert result.exit_code == 0, result.output
    assert seen == [f"dmerge run {recipe} 'some out' --chunk-size 4096 {kept} --resume"]


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143)])
def test_client_stopped_on_a_real_cluster_resumes_there(family, tmp_path, monkeypatch, sig, code):
    """`dmerge run --scheduler` on a real scheduler and worker processes: SIGKILL or
    SIGTERM the client mid-merge, then --resume on the same cluster: the same bytes, less
    work."""
    from conftest import dask_cluster

    merge = SlowMerge(tmp_path, family)
    monkeypatch.setenv("SLOWFS_DELAY", "0.02")  # the workers read (slowly), during the resume too
    with dask_cluster(n_workers=2, nthreads=1, worker_args=("--preload", "slowfs"),
                      pythonpath=(str(tmp_path),)) as (address, _):
        merge.command = functools.partial(SlowMerge.command, merge, "--scheduler", address)
        returned, err = merge.interrupt(sig, after_units=20)
        assert returned == code, err
        journaled = _assert_unfinished(merge.out)
        resumed = merge.resume()
    assert resumed.returncode == 0, resumed.stderr
    reference, full = _undisturbed(tmp_path, family)
    _assert_finished_like(merge.out, reference)
    done = _summary(resumed.stdout)
    assert done["resumed"] >= len(journaled) and done["tasks"] < full["tasks"]
