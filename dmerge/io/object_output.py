"""Output to an S3-compatible object store: each shard one multipart upload, its parts
written by many workers at once.

The plan's layout fixes every shard's bytes before any math, so parts can be planned up
front (:func:`plan_parts`): consecutive write units grouped until a part holds at least
5 MiB (S3's minimum for every part but the last), big tensors split on their chunk
boundaries, at most 10,000 parts per shard. One task builds one part in memory (the
shard header, small tensors, or one chunk of a big tensor) and uploads it with the
upload id the client created; S3 lets any process holding that id upload parts, so no
bytes pass through the client.

The client (:class:`ObjectOutput`) creates the uploads, completes them once every part
exists, then writes ``config.json``, the tokenizer, the card and, last, the index: a
prefix with an index is complete. While the merge runs the prefix holds two small
objects: ``DMERGE_UNFINISHED`` (what to run to continue) and ``.dmerge-run.json`` (the
run's fingerprint and the upload id of every shard). The uploads' own part lists are the
journal: ``--resume`` lists them and uploads only the parts missing. A merge that fails
aborts its uploads, so no incomplete upload is left to bill the user; one interrupted
(Ctrl-C, SIGTERM, a killed client) keeps them, recorded in ``.dmerge-run.json``, for
``--resume``; ``--overwrite`` aborts them.

Other object stores (gs://, az://, hf://) have no multipart API that several processes
can share through fsspec; write those to a local or shared folder (and ``--push-to-hub``
for the Hub). GCS speaks the S3 API too (``endpoint_url`` in ``--storage-options``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from dmerge.errors import DMergeError
from dmerge.io import storage
from dmerge.io.journal import check_same_plan
from dmerge.io.output import INDEX_NAMES, MERGE_FILES, is_weight_file

MIB = 1 << 20
MIN_PART = 5 * MIB  # S3: every part but the last
MAX_PART = 5 << 30  # S3: 5 GiB per part
MAX_PARTS = 10_000  # S3: parts per upload

RUN_FILE = ".dmerge-run.json"
MARKER_FILE = "DMERGE_UNFINISHED"
RUN_FORMAT = 1


@dataclass(frozen=True)
class Part:
    """Bytes ``[start, stop)`` of shard ``shard``, uploaded as part ``number`` (from 1):
    the shard header if ``header``, then the write units ``members`` ((tensor, chunk)
    pairs) in byte order."""

    shard: int
    number: int
    start: int
    stop: int
    members: tuple[tuple[int, int], ...]
    header: bool = False

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_parts(plan, min_part: int = MIN_PART, max_parts: int = MAX_PARTS) -> list[Part]:
    """The upload parts of every shard (see the module docstring): consecutive write
    units grouped until a part reaches ``min_part`` bytes; only a shard's last part may
    be smaller."""
    parts: list[Part] = []
    for si, shard in enumerate(plan.shards):
        units = []  # (start, stop, member or None for the header)
        if shard.header:
            units.append((0, len(shard.header), None))
        for ti in sorted(shard.tensors, key=lambda t: plan.tensors[t].offset):
            tp = plan.tensors[ti]
            for c in range(tp.n_chunks):
                r0, r1 = tp.chunk_rows(c)
                units.append((tp.offset + r0 * tp.row_bytes, tp.offset + r1 * tp.row_bytes, (ti, c)))
        shard_parts: list[Part] = []
        group: list = []
        for unit in units:
            if group and group[-1][1] != unit[0]:
                raise AssertionError(f"shard {shard.name}: write units are not contiguous at byte {unit[0]}")
            group.append(unit)
            if group[-1][1] - group[0][0] >= min_part:
                shard_parts.append(_part(si, len(shard_parts) + 1, group))
                group = []
        if group:
            shard_parts.append(_part(si, len(shard_parts) + 1, group))
        if len(shard_parts) > max_parts:
            raise DMergeError(f"shard {shard.name} would need {len(shard_parts)} upload parts, more than the "
                              f"{max_parts} S3 allows; use a smaller --out-shard-size")
        big = max(shard_parts, key=lambda p: p.size, default=None)
        if big is not None and big.size > MAX_PART:
            raise DMergeError(f"shard {shard.name}: an upload part of {big.size} bytes exceeds S3's 5 GiB; "
                              "use a smaller --chunk-size")
        parts.extend(shard_parts)
    return parts


def _part(shard: int, number: int, group: list) -> Part:
    return Part(shard, number, group[0][0], group[-1][1], tuple(u[2] for u in group if u[2] is not None),
                header=group[0][2] is None)


@dataclass(frozen=True)
class ObjectShard:
    """A sink for the parts of one shard's multipart upload (picklable: sent with tasks)."""

    url: str  # s3://bucket/prefix/model-00001-of-00003.safetensors
    upload_id: str

    def upload(self, number: int, payload) -> str:
        """Upload part ``number``; returns its ETag. Idempotent: uploading a part again
        replaces it."""
        fs, path = storage.filesystem_for(self.url)
        bucket, key = _split(path)
        body = bytes(payload)
        response = storage.with_retries(
            self.url, lambda: fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=self.upload_id,
                                         PartNumber=number, Body=body), f"upload part {number} of")
        return response["ETag"]


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def is_object_store(location: str) -> bool:
    """Whether ``location`` is an output :class:`ObjectOutput` writes."""
    return storage.protocol_of(location) in ("s3", "s3a")


class ObjectOutput:
    """An output prefix in an S3-compatible bucket (see the module docstring)."""

    def __init__(self, url: str, overwrite: bool = False):
        if not is_object_store(url):
            raise DMergeError(
                f"cannot write the output to {url}: dmerge writes to local or shared folders and to "
                "S3-compatible object stores (s3://; GCS, R2 and MinIO through their S3 endpoints with "
                "--storage-options '{\"endpoint_url\": ...}'); for the Hugging Face Hub write locally and "
                "pass --push-to-hub")
        self.folder = url.rstrip("/")
        self.fs, self.path = storage.filesystem_for(self.folder)
        self.bucket, self.prefix = _split(self.path.rstrip("/"))
        self.overwrite = overwrite
        self.uploads: dict[str, str] = {}  # shard name -> upload id
        self.completed: list[str] = []  # shards whose upload this run (or the one it resumes) completed
        self._header: dict | None = None
        self._written: list[str] = []
        self._earlier: list[str] = []
        self._owns_run = False  # this run wrote the run file and marker

    # -- locations ------------------------------------------------------------------

    def key(self, name: str) -> str:
        return posixpath.join(self.prefix, name) if self.prefix else name

    def url(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def _s3(self, method: str, what: str, **kwargs):
        return storage.with_retries(self.folder, lambda: self.fs.call_s3(method, Bucket=self.bucket, **kwargs), what)

    def _listing(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.path)
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return []

    # -- start ----------------------------------------------------------------------

    def begin(self, plan, header: dict, resume: bool, resume_command: str | None, parts: list[Part]) -> set:
        """Check the prefix, create (or with ``resume`` find again) each shard's upload,
        and write the run file and marker. Returns the ``(shard, part number)`` pairs
        already uploaded with their planned size (a resumed run's)."""
        existing = self._listing()
        earlier_run = self._read_run() if RUN_FILE in existing else None
        if earlier_run is not None and not resume and not self.overwrite:
            raise DMergeError(f"an unfinished merge is in {self.folder}; pass --resume to continue it "
                              "or --overwrite to start again")
        if resume and earlier_run is None:
            if any(is_weight_file(n) for n in existing) and "model.safetensors.index.json" in existing:
                raise DMergeError(f"{self.folder} holds a finished merge; there is nothing to resume")
            if existing:
                raise DMergeError(f"there is no unfinished dmerge merge in {self.folder} to resume "
                                  f"({RUN_FILE} is missing); run without --resume")
        weights = [n for n in existing if is_weight_file(n)]
        if weights and not self.overwrite and earlier_run is None:
            shown = ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
            raise DMergeError(f"{self.folder} already holds model weights ({shown}); pass --overwrite to replace "
                              "them (the earlier model stays until the new merge is complete)")
        self._earlier = [n for n in existing if is_weight_file(n) or n in MERGE_FILES]
        done: set = set()
        if earlier_run is not None and resume:
            check_same_plan(self.folder, earlier_run.get("fingerprint"), header["fingerprint"])
            names = {s.name for s in plan.shards}
            self.uploads = {n: u for n, u in earlier_run.get("uploads", {}).items() if n in names}
            # a shard completed before the interruption is an object now: the run file
            # says so (an object of that name alone could be an earlier model's)
            self.completed = [n for n in earlier_run.get("completed", []) if n in names and n in existing]
            expected = {(p.shard, p.number): p.size for p in parts}
            for si, shard in enumerate(plan.shards):
                if shard.name in self.completed:
                    done |= {key for key in expected if key[0] == si}
                    continue
                upload_id = self.uploads.get(shard.name)
                listed = self.list_parts(shard.name, upload_id) if upload_id else None
                if listed is None:  # aborted or expired meanwhile: start that shard again
                    self.uploads.pop(shard.name, None)
                    continue
                done |= {(si, n) for n, (size, _) in listed.items() if expected.get((si, n)) == size}
        elif earlier_run is not None:  # --overwrite: the earlier run's uploads go
            self._abort_uploads(earlier_run.get("uploads", {}))
        for shard in plan.shards:
            if shard.name not in self.uploads and shard.name not in self.completed:
                created = self._s3("create_multipart_upload", "start an upload of", Key=self.key(shard.name))
                self.uploads[shard.name] = created["UploadId"]
        self._owns_run = True
        self._header = header
        self._write_run(header)
        self._put(MARKER_FILE, _marker_text(self.folder, resume_command).encode())
        return done

    def sinks(self, plan) -> list[ObjectShard | None]:
        """One sink per shard (None for a shard already complete: no part of it is left)."""
        return [ObjectShard(self.url(s.name), self.uploads[s.name]) if s.name in self.uploads else None
                for s in plan.shards]

    def list_parts(self, shard_name: str, upload_id: str) -> dict[int, tuple[int, str]] | None:
        """The parts an upload holds: number -> (size, ETag); None if the upload is gone."""
        found: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            try:
                page = self._s3("list_parts", "list the parts of", Key=self.key(shard_name), UploadId=upload_id,
                                PartNumberMarker=marker, MaxParts=1000)
            except FileNotFoundError:  # the upload is gone (s3fs maps NoSuchUpload to it)
                return None
            except DMergeError as e:
                if "NoSuchUpload" in str(e):
                    return None
                raise
            for p in page.get("Parts", []):
                found[int(p["PartNumber"])] = (int(p["Size"]), p["ETag"])
            if not page.get("IsTruncated"):
                return found
            marker = int(page["NextPartNumberMarker"])

    # -- finish ---------------------------------------------------------------------

    def commit_shards(self, shards, parts: list[Part] | None = None) -> None:
        """Complete every shard's upload from its listed parts (all planned parts must
        be there). An earlier merge's index goes first (the prefix no longer looks
        complete), then weights of it that this merge does not replace."""
        for name in self._earlier:
            if name in INDEX_NAMES:
                self._delete(name)
        count: dict[int, int] = {}
        for p in parts or []:
            count[p.shard] = max(count.get(p.shard, 0), p.number)
        for si, shard in enumerate(shards):
            if shard.name in self.completed:
                continue
            listed = self.list_parts(shard.name, self.uploads[shard.name]) or {}
            wanted = count.get(si, len(listed))
            missing = [n for n in range(1, wanted + 1) if n not in listed]
            if missing:
                raise DMergeError(f"{self.url(shard.name)}: upload parts {missing[:5]} are missing at completion")
            self._s3("complete_multipart_upload", "complete the upload of", Key=self.key(shard.name),
                     UploadId=self.uploads[shard.name],
                     MultipartUpload={"Parts": [{"PartNumber": n, "ETag": listed[n][1]}
                                                for n in range(1, wanted + 1)]})
            self._written.append(shard.name)
            self.completed.append(shard.name)
            del self.uploads[shard.name]
            self._write_run(self._header)  # a resume after this point keeps the shard
        names = {s.name for s in shards}
        for name in self._earlier:
            if is_weight_file(name) and name not in names:
                self._delete(name)
        self.uploads = {}

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, doc: dict) -> None:
        self.write_text(name, json.dumps(doc, indent=2) + "\n")

    def write_bytes(self, name: str, data: bytes) -> None:
        self._put(name, data)
        self._written.append(name)

    def write_index(self, doc: dict, name: str = "model.safetensors.index.json") -> None:
        """Write the index, last (it marks the prefix complete), after removing files of an
        earlier merge this one did not write again; then the run file and marker go."""
        for old in self._earlier:
            if old not in self._written and old not in self.completed and old != name:
                self._delete(old)
        self.write_json(name, doc)
        self._delete(RUN_FILE)
        self._delete(MARKER_FILE)

    def abort(self) -> None:
        """A failed merge: abort its uploads (nothing left to bill) and remove what it wrote."""
        self._abort_uploads(self.uploads)
        self.uploads = {}
        # shards completed by the run this one resumed are this merge's too
        for name in dict.fromkeys(self._written + self.completed + ([RUN_FILE, MARKER_FILE] if self._owns_run else [])):
            self._delete(name)
        self._written.clear()
        self.completed = []

    # -- small objects ----------------------------------------------------------------

    def _put(self, name: str, data: bytes) -> None:
        storage.with_retries(self.url(name), lambda: self.fs.pipe_file(f"{self.path}/{name}", data), "write")

    def _delete(self, name: str) -> None:
        try:
            storage.with_retries(self.url(name), lambda: self.fs.rm_file(f"{self.path}/{name}"), "remove")
        except FileNotFoundError:
            pass

    def _read_run(self) -> dict:
        try:
            doc = json.loads(storage.read_bytes(self.url(RUN_FILE)))
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("dmerge_run") != RUN_FORMAT:
            raise DMergeError(f"{self.url(RUN_FILE)} is not a dmerge run file this version reads; "
                              "pass --overwrite to start again")
        return doc

    def _write_run(self, header: dict) -> None:
        doc = {"dmerge_run": RUN_FORMAT, "fingerprint": header["fingerprint"], "run_id": header["run_id"],
               "dmerge_version": header.get("dmerge_version"), "uploads": self.uploads,
               "completed": self.completed}
        self._put(RUN_FILE, (json.dumps(doc, indent=1) + "\n").encode())

    def _abort_uploads(self, uploads: dict[str, str]) -> None:
        for name, upload_id in uploads.items():
            try:
                self._s3("abort_multipart_upload", "abort the upload of", Key=self.key(name), UploadId=upload_id)
            except DMergeError as e:
                if "NoSuchUpload" not in str(e):
                    raise


def _marker_text(folder: str, resume_command: str | None) -> str:
    how = (f"To continue it, run:\n\n    {resume_command}\n" if resume_command
           else "To continue it, run the same dmerge command again with --resume.\n")
    return (f"{folder} holds an unfinished dmerge merge: its shards are S3 multipart uploads not yet\n"
            f"completed (their ids are in {RUN_FILE}) and it has no index yet.\n\n{how}\n"
            "To start again instead, run the merge with --overwrite (it aborts these uploads).\n")


__all__ = ["Part", "plan_parts", "ObjectShard", "ObjectOutput", "is_object_store", "MIN_PART", "MAX_PARTS"]
