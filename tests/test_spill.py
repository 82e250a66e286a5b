"""The spill of remote parent bytes between a method's passes: bounded, exact, and gone
once the process is (even a killed one's, at the next spill)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import SLOW_FS, TIES, shard_bytes, write_recipe
from dmerge.io.spill import Spill


def test_keep_then_take(tmp_path, monkeypatch):
    monkeypatch.setenv("DMERGE_SPILL_DIR", str(tmp_path))
    spill = Spill(budget=100)
    data = bytes(range(60))
    assert spill.put("s3://b/f", 8, memoryview(data))
    assert not spill.put("s3://b/g", 0, memoryview(bytes(50)))  # over the budget: not kept
    out = bytearray(60)
    assert spill.get_into("s3://b/f", 8, memoryview(out)) and bytes(out) == data
    assert not spill.get_into("s3://b/f", 9, memoryview(bytearray(60)))  # another range
    assert spill.get_into("s3://b/f", 8, memoryview(out), take=True)
    assert not spill.get_into("s3://b/f", 8, memoryview(out))  # taken: gone, budget free again
    assert spill.put("s3://b/g", 0, memoryview(bytes(90)))
    folder = spill.folder()
    spill.remove()
    assert not os.path.exists(folder)


def test_a_killed_process_spill_is_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("DMERGE_SPILL_DIR", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = tmp_path / f"dmerge-spill-{dead}-abc"
    orphan.mkdir()
    (orphan / "entry").write_bytes(b"x" * 10)
    alive = tmp_path / f"dmerge-spill-{os.getppid()}-def"  # a running process's: kept
    alive.mkdir()
    spill = Spill(budget=100)
    spill.put("s3://b/f", 0, memoryview(b"abc"))
    assert not orphan.exists() and alive.exists()
    spill.remove()


def test_a_merge_from_a_url_leaves_no_spill(family, tmp_path):
    """ties over a URL spills; the command's own process exits without exit handlers
    (os._exit after a finished merge) and still removes its spill."""
    (tmp_path / "slowfs.py").write_text(SLOW_FS)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    urls = {k: f"slowfile://{v}" for k, v in family.items()}
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**urls))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()] + sys.path),
           "DMERGE_SPILL_DIR": str(spill_dir), "SLOWFS_DELAY": "0"}
    proc = subprocess.run([sys.executable, "-c", "import slowfs; from dmerge.cli import main; main()", "run", recipe,
                           str(tmp_path / "out"), "--chunk-size", "16K", "--quiet"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(spill_dir.iterdir()) == []
    local = write_recipe(tmp_path / "l.yml", TIES.format(**family))
    subprocess.run([sys.executable, "-m", "dmerge.cli", "run", local, str(tmp_path / "local"), "--chunk-size", "16K",
                    "--quiet"], check=True, timeout=300)
    assert shard_bytes(str(tmp_path / "out")) == shard_bytes(str(tmp_path / "local"))
