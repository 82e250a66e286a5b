"""The output folder: never two merges' weights in one folder, space checked up front,
SIGTERM handled like Ctrl-C (the folder left unfinished, to resume), what the user is
told is what happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import SLOW_FS, load_folder, write_recipe
from dmerge.cli import main

LINEAR = """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: {w1}}}
  - model: {ft2}
    parameters: {{weight: 1.0}}
dtype: bfloat16
"""


def _run(*args: str):
    return CliRunner().invoke(main, ["run", *args])


def _recipe(tmp_path, family, w1: float, name: str = "r.yml") -> str:
    return write_recipe(tmp_path / name, LINEAR.format(w1=w1, **family))


def _weights(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".json", ".partial")))


def test_folder_with_weights_is_refused_without_overwrite(family, tmp_path):
    out = str(tmp_path / "out")
    assert _run(_recipe(tmp_path, family, 1.0), out, "-q").exit_code == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    result = _run(_recipe(tmp_path, family, 3.0, "b.yml"), out, "-q")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "--overwrite" in result.stderr and "mergekit" in result.stderr
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_overwrite_replaces_a_single_file_model_with_shards(family, tmp_path):
    """The case users hit: model.safetensors, then shards + index in the same folder.
    transformers loads model.safetensors first, so a stale one would hide the new merge."""
    out = str(tmp_path / "out")
    assert _run(_recipe(tmp_path, family, 1.0), out, "-q").exit_code == 0
    assert "model.safetensors" in os.listdir(out)
    result = _run(_recipe(tmp_path, family, 3.0, "b.yml"), out, "-q", "--overwrite", "--out-shard-size", "100K")
    assert result.exit_code == 0, result.output
    names = os.listdir(out)
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert not [n for n in names if n.endswith(".partial")]
    fresh = str(tmp_path / "fresh")
    assert _run(_recipe(tmp_path, family, 3.0, "b.yml"), fresh, "-q", "--out-shard-size", "100K").exit_code == 0
    assert _weights(out) == _weights(fresh)
    a, b = load_folder(out), load_folder(fresh)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_overwrite_keeps_the_earlier_model_when_the_new_merge_fails(family, tmp_path):
    out = str(tmp_path / "out")
    assert _run(_recipe(tmp_path, family, 1.0), out, "-q").exit_code == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    # weights so large that float16 overflows: the merge fails in its tasks, mid-run
    bad = write_recipe(tmp_path / "bad.yml", LINEAR.format(w1=1e6, **family).replace("weight: 1.0", "weight: 1e6")
                       .replace("dtype: bfloat16", "dtype: float16\nparameters: {normalize: false}"))
    result = _run(bad, out, "-q", "--overwrite", "--no-copy-tokenizer")
    assert result.exit_code == 1, result.output
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_disk_space_is_checked_before_writing(family, tmp_path, monkeypatch):
    import dmerge.io.output as output

    monkeypatch.setattr(output, "disk_free", lambda folder: 10_000)
    out = str(tmp_path / "out")
    result = _run(_recipe(tmp_path, family, 1.0), out, "-q")
    assert result.exit_code == 1
    line = result.stderr.strip()
    from dmerge.units import format_bytes

    assert "\n" not in line and "not enough disk space" in line and "needs" in line, line
    assert f"{format_bytes(10_000)} are free" in line, line
    assert not os.path.exists(out)


def test_summary_goes_to_stdout_and_counts_what_happened(family, tmp_path):
    out = str(tmp_path / "out")
    result = _run(_recipe(tmp_path, family, 1.0), out, "--chunk-size", "8K")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("wrote ") and result.stdout.count("\n") == 1
    plan = CliRunner().invoke(main, ["plan", _recipe(tmp_path, family, 1.0), "--chunk-size", "8K"])
    tasks = next(ln for ln in plan.stdout.splitlines() if ln.startswith("tasks:")).split()[1]
    assert f", {tasks} tasks)" in result.stdout
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
    from dmerge.units import format_bytes

    assert result.stdout.startswith(f"wrote {out}: {format_bytes(size)} in ")
    assert "100%" in result.stderr.replace("\r", "\n").splitlines()[-1] or "100%" in result.stderr




@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("when", ["early", "mid-merge"])
def test_sigterm_stops_promptly_and_leaves_the_merge_unfinished(family, tmp_path, sig, code, word, when):
    (tmp_path / "slowfs.py").write_text(SLOW_FS)
    slow = {k: f"slowfile://{v}" for k, v in family.items()}
    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(w1=1.0, **slow))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path)] + sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", "import slowfs; from dmerge.cli import main; main()", "run",
                             recipe, str(out), "--chunk-size", "4K"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        journal = out / ".dmerge-journal.jsonl"
        # early: as the cluster starts and the graph is submitted (a signal raised inside
        # Dask's code there once left the client waiting forever); mid-merge: write units
        # are being journaled
        started = (lambda: (out / "DMERGE_UNFINISHED").exists()) if when == "early" else (
            lambda: journal.exists() and journal.read_text().count("\n") >= 4)
        while not started():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        sent = time.time()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert time.time() - sent < 15
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{word}; the unfinished merge in {out} can be continued: "), err
    assert last.endswith(" --resume"), err
    names = os.listdir(out)  # plainly unfinished: partial shards, journal and marker, no index
    assert {"DMERGE_UNFINISHED", ".dmerge-journal.jsonl"} <= set(names), names
    assert any(n.endswith(".partial") for n in names) and not any(n.endswith((".json", ".safetensors")) for n in names)


def test_index_agrees_with_written_shards(family, tmp_path):
    out = str(tmp_path / "out")
    assert _run(_recipe(tmp_path, family, 1.0), out, "-q", "--out-shard-size", "100K").exit_code == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    from dmerge.io.model_source import open_model

    model = open_model(out)  # checks the index against every shard header
    assert set(model.tensors) == set(index["weight_map"])
