"""The journal of a run: which write units are done, so an interrupted merge can resume.

While a merge runs, its output folder holds two files besides the ``.partial`` shards:

* ``DMERGE_UNFINISHED``, plain text for whoever looks at the folder: the merge is not
  finished, and the command that continues it.
* ``.dmerge-journal.jsonl``: a header line, then one line per finished write unit (one
  chunk task's contiguous byte range of one shard), appended by the client as the
  tasks report. Every line is flushed as it is written (it survives the client being
  killed); the file is fsynced at most about once a second (it survives most power cuts
  too, and what it claims is checked against the shards on resume anyway).

Header: ``{"dmerge_journal": 1, "fingerprint": ..., "run_id": ..., "dmerge_version": ...,
"checksum": "crc32", "shards": [{"name": ..., "size": ...}, ...], "units": N}``.
Unit: ``{"t": tensor index, "c": chunk index, "tensor": name, "shard": name,
"offset": byte offset in the shard file, "length": bytes, "crc32": checksum}``.

Both files are removed once the index is written: a folder with an index is complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from dmerge.errors import DMergeError

JOURNAL_NAME = ".dmerge-journal.jsonl"
MARKER_NAME = "DMERGE_UNFINISHED"
JOURNAL_FORMAT = 1
FSYNC_EVERY_S = 1.0


@dataclass(frozen=True)
class WriteUnit:
    """One finished write: chunk ``c`` of tensor ``t``, ``length`` bytes at ``offset`` of
    ``shard``, whose CRC-32 is ``crc32``."""

    t: int
    c: int
    tensor: str
    shard: str
    offset: int
    length: int
    crc32: int


def journal_path(folder: str) -> str:
    return os.path.join(folder, JOURNAL_NAME)


def marker_path(folder: str) -> str:
    return os.path.join(folder, MARKER_NAME)


def is_unfinished(folder: str) -> bool:
    """Whether ``folder`` holds an interrupted dmerge run (its marker or its journal)."""
    return os.path.exists(marker_path(folder)) or os.path.exists(journal_path(folder))


def read_journal(folder: str) -> tuple[dict, list[WriteUnit]]:
    """The journal's header and its units (the last line for a unit written twice).

    A torn last line (the client killed while appending) is ignored; any other
    unreadable line is an error.
    """
    path = journal_path(folder)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise DMergeError(f"no journal of an unfinished merge in {folder} ({JOURNAL_NAME} is missing)") from None
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("dmerge_journal") != JOURNAL_FORMAT:
        raise DMergeError(f"{path} is not a dmerge journal this version reads; pass --overwrite to start again")
    units: dict[tuple[int, int], WriteUnit] = {}
    body = lines[1:]
    for i, line in enumerate(body):
        if not line.strip():
            continue
        try:
            unit = WriteUnit(**json.loads(line))
        except (ValueError, TypeError):
            if i == len(body) - 1:  # no newline after it: torn by a killed client
                continue
            raise DMergeError(f"{path}: line {i + 2} is unreadable; pass --overwrite to start again") from None
        units[(unit.t, unit.c)] = unit
    return header, list(units.values())


class Journal:
    """The open journal of a running merge (see the module docstring)."""

    def __init__(self, folder: str, header: dict, units: list[WriteUnit] = ()):
        """Start the journal: ``header`` and the ``units`` already known to be done
        (a resumed run's verified ones), written to a new file that replaces any
        earlier journal at once."""
        self.path = journal_path(folder)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
            for unit in units:
                f.write(_line(unit))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._synced = time.monotonic()

    def record(self, unit: WriteUnit) -> None:
        """Append a finished unit: flushed now, fsynced if the last fsync is a second old."""
        self._file.write(_line(unit))
        self._file.flush()
        now = time.monotonic()
        if now - self._synced >= FSYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._synced = now

    def close(self) -> None:
        """Flush and fsync what was recorded, and close the file (idempotent)."""
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def _line(unit: WriteUnit) -> str:
    return json.dumps(asdict(unit), separators=(",", ":")) + "\n"


def check_same_plan(folder: str, earlier: str | None, now: str) -> None:
    """A resumed run must have the plan fingerprint of the run it continues."""
    if earlier != now:
        raise DMergeError(
            f"the unfinished merge in {folder} was planned differently (the recipe, a parent model or an option "
            f"changed since it started: plan {earlier}, now {now}); resume with the original command, or pass "
            "--overwrite instead of --resume to start again")


def write_marker(folder: str, resume_command: str | None) -> None:
    """Write the plain-text note that says the folder holds an unfinished merge."""
    how = (f"To continue it, run (from {os.getcwd()}):\n\n    {resume_command}\n" if resume_command
           else "To continue it, run the same dmerge command again with --resume.\n")
    text = (
        "This folder holds an unfinished dmerge merge.\n\n"
        "Its shards are still <name>.partial and it has no model.safetensors.index.json yet;\n"
        f"{JOURNAL_NAME} lists the parts already written.\n\n"
        f"{how}\n"
        "To start again instead, run the merge with --overwrite.\n"
    )
    with open(marker_path(folder), "w") as f:
        f.write(text)


def remove_journal(folder: str) -> None:
    """Remove the journal and the marker (the merge finished, or was abandoned)."""
    for path in (journal_path(folder), journal_path(folder) + ".tmp", marker_path(folder)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


__all__ = ["check_same_plan", "JOURNAL_NAME", "MARKER_NAME", "WriteUnit", "Journal", "read_journal", "write_marker", "remove_journal",
           "is_unfinished"]
