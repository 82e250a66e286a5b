"""Remote parent bytes kept on the worker's local disk between a method's two passes.

A method with tensor-wide statistics reads each chunk of a tensor split into several
chunks twice: once for its statistics, once to merge (and radix select a third time
where its prediction missed). From local disk that costs page-cache reads; from an
object store or the Hub every read is a paid, slow fetch. So the statistic passes keep
what they fetched from a remote parent in a spill folder on local disk, and the later
passes on the same machine read it from there; the write pass deletes each entry it uses.
Each remote byte is then fetched once where the passes of a chunk run on one machine
(always without a cluster; on a cluster, where the scheduler places them together).

The spill is bounded (``DMERGE_SPILL_BYTES``, default the smaller of 16 GiB and a quarter
of the free space; 0 turns it off) and lives in ``DMERGE_SPILL_DIR`` (default the
system's temporary folder), in a folder of this process removed at exit (and, should
the process be killed, by the next dmerge process that spills there). A full spill
just means fetching again. Entries are keyed by (location, offset, length); writing one
is atomic (a temporary name, then a rename), so a reader never sees half an entry.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading

GIB = 1 << 30


class Spill:
    """A bounded folder of byte ranges of remote files."""

    def __init__(self, folder: str | None = None, budget: int | None = None):
        self._folder = folder
        self._budget = budget
        self._used = 0
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def budget(self) -> int:
        if self._budget is None:
            env = os.environ.get("DMERGE_SPILL_BYTES")
            if env is not None:
                from dmerge.units import parse_size

                self._budget = parse_size(env)
            else:
                free = shutil.disk_usage(self._root()).free
                self._budget = min(16 * GIB, free // 4)
        return self._budget

    def _root(self) -> str:
        return os.environ.get("DMERGE_SPILL_DIR") or tempfile.gettempdir()

    def folder(self) -> str:
        if self._folder is None:
            with self._lock:
                if self._folder is None:
                    _remove_orphans(self._root())
                    self._folder = tempfile.mkdtemp(prefix=f"dmerge-spill-{os.getpid()}-", dir=self._root())
                    atexit.register(self.remove)
        return self._folder

    def remove(self) -> None:
        """Delete the spill folder and everything in it (at exit; also called by the
        command line before it leaves without running exit handlers)."""
        with self._lock:
            folder, self._folder = self._folder, None
            self._sizes.clear()
            self._used = 0
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _name(location: str, offset: int, length: int) -> str:
        return hashlib.sha1(f"{location}\0{offset}\0{length}".encode()).hexdigest()

    def put(self, location: str, offset: int, data) -> bool:
        """Keep ``data`` (the bytes of ``location`` at ``offset``); False when over budget."""
        n = len(data)
        name = self._name(location, offset, n)
        with self._lock:
            if name in self._sizes or self._used + n > self.budget:
                return False
            self._used += n
            self._sizes[name] = n
        path = os.path.join(self.folder(), name)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        except OSError:  # a full or failing disk: fetch again instead
            self._forget(name)
            return False
        return True

    def get_into(self, location: str, offset: int, out: memoryview, take: bool = False) -> bool:
        """Fill ``out`` from the spill if it holds that range; ``take`` removes the entry."""
        name = self._name(location, offset, len(out))
        with self._lock:
            if name not in self._sizes:
                return False
        path = os.path.join(self.folder(), name)
        try:
            with open(path, "rb") as f:
                got = f.readinto(out)
        except FileNotFoundError:
            return False
        if got != len(out):
            return False
        if take:
            self._forget(name)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        with self._lock:
            self.hits += 1
        return True

    def _forget(self, name: str) -> None:
        with self._lock:
            self._used -= self._sizes.pop(name, 0)


def _remove_orphans(root: str) -> None:
    """Remove the spill folders of processes that are gone (killed: no exit handler ran)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if not name.startswith("dmerge-spill-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # alive but another user's, or unknowable: leave it
            pass


spill = Spill()

__all__ = ["Spill", "spill"]
