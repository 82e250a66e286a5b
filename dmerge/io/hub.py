"""The Hugging Face Hub: models by id, read by byte range; merged models pushed there.

* **Resolving an id** (``org/name`` or ``org/name@revision`` in a recipe): a complete
  snapshot in the local HF cache is used as a local folder, as transformers would
  (``HF_HUB_CACHE``/``HF_HOME``; nothing downloaded); with ``HF_HUB_OFFLINE=1`` only the
  cache is consulted, and a model not fully there is one clear error. Otherwise the model
  is read remotely, as ``hf://org/name@revision``.
* **Ranged reads**: each file's download URL is resolved once per process (one ``HEAD``
  on ``/resolve/``, which the Hub rate-limits) and its redirect target, a signed CDN URL,
  is kept and used for every range; a target that has expired (403/410) is resolved again.
  The token comes from ``HF_TOKEN`` or the saved login, as everywhere in the ecosystem.
* **Pushing**: ``--push-to-hub org/name`` uploads a finished, verified output folder
  with huggingface_hub's upload API.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

from dmerge.errors import DMergeError, InputModelError

_HF_URL = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(@(?P<rev>[^/]+))?(/(?P<path>.*))?$")
RESOLVE_TTL_S = 30 * 60  # signed CDN URLs last about an hour; resolve again well before


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the library reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def cache_dir() -> str | None:
    """The HF cache folder as the environment sets it now (None: the library's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def split_reference(model: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``)."""
    repo, _, rev = model.partition("@")
    return repo, rev or None


def resolve_hub_model(model: str) -> str:
    """A Hub id's location: its cached snapshot folder when the cache holds the whole
    model, else ``hf://org/name[@rev]`` (an error when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, rev = split_reference(model)
    try:
        folder = snapshot_download(repo, revision=rev, cache_dir=cache_dir(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        folder = None
    missing = _missing_weights(folder) if folder else ["config.json"]
    if not missing:
        return folder
    if offline():
        where = cache_dir() or "the default HF cache"
        what = "is not in" if folder is None else f"is only partly in ({missing[0]} is missing from)"
        raise InputModelError(f"model {model} {what} {where}, and HF_HUB_OFFLINE is set: download it first "
                              f"(huggingface-cli download {repo}{' --revision ' + rev if rev else ''}) or unset "
                              "HF_HUB_OFFLINE to read it from the Hub")
    return f"hf://{repo}" + (f"@{rev}" if rev else "")


def _missing_weights(folder: str) -> list[str]:
    """Files a merge needs that a cached snapshot lacks (config, index, shards)."""
    need = ["config.json"]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        need.append("model.safetensors")
    elif os.path.exists(index):
        try:
            with open(index) as f:
                need += sorted(set(json.load(f).get("weight_map", {}).values()))
        except (OSError, ValueError):
            return ["model.safetensors.index.json"]
    else:
        need.append("model.safetensors")
    return [n for n in need if not os.path.exists(os.path.join(folder, n))]


def parse_url(location: str) -> tuple[str, str | None, str]:
    """``hf://org/name[@rev]/path`` -> (repo, revision, path in the repo)."""
    m = _HF_URL.match(location)
    if not m or not m.group("path"):
        raise DMergeError(f"{location}: not a Hub file URL (hf://org/name[@revision]/file)")
    return m.group("repo"), m.group("rev"), m.group("path")


class RedirectCache:
    """Download URLs of Hub files, resolved once and reused for every ranged read."""

    def __init__(self, ttl_s: float = RESOLVE_TTL_S):
        self.ttl_s = ttl_s
        self._targets: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.resolves = 0  # how many times the Hub was asked (for tests and the summary)

    def target(self, location: str, refresh: bool = False) -> str:
        """The URL the bytes of ``location`` are served from."""
        now = time.monotonic()
        with self._lock:
            cached = self._targets.get(location)
        if cached and not refresh and now - cached[1] < self.ttl_s:
            return cached[0]
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        repo, rev, path = parse_url(location)
        endpoint = os.environ.get("HF_ENDPOINT") or None
        url = hf_hub_url(repo, path, revision=rev, endpoint=endpoint)
        meta = get_hf_file_metadata(url, endpoint=endpoint)
        with self._lock:
            self.resolves += 1
            self._targets[location] = (meta.location, now)
        return meta.location

    def read(self, location: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of a Hub file: a Range request on its cached target
        (resolved again once if the target has expired)."""
        from huggingface_hub.utils import get_session

        for attempt in (0, 1):
            target = self.target(location, refresh=attempt == 1)
            # the target is signed (CDN) or the resolve URL itself (no redirect): only the
            # latter needs the token
            headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
            if "/resolve/" in target:
                from huggingface_hub.utils import build_hf_headers

                headers.update(build_hf_headers())
            response = get_session().get(target, headers=headers, follow_redirects=True)
            if response.status_code in (403, 410) and attempt == 0 and "/resolve/" not in target:
                continue  # an expired signature: resolve again
            if response.status_code == 404:
                raise FileNotFoundError(location)
            if response.status_code in (401, 403):
                raise PermissionError(f"{location}: HTTP {response.status_code}")
            response.raise_for_status()
            return response.content
        raise AssertionError("unreachable")


redirects = RedirectCache()


# -- pushing -------------------------------------------------------------------------------


def verify_output(folder: str) -> int:
    """Check that ``folder`` holds a finished merge: an index, every shard it names with a
    readable header, together holding the index's tensors and total size. Returns the
    number of shards."""
    from dmerge.io.model_source import read_safetensors_header

    index_path = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        raise DMergeError(f"{folder} is not a finished merge (no model.safetensors.index.json); nothing pushed")
    if os.path.exists(os.path.join(folder, "DMERGE_UNFINISHED")):
        raise DMergeError(f"{folder} holds an unfinished merge; nothing pushed")
    with open(index_path) as f:
        index = json.load(f)
    weight_map = index.get("weight_map", {})
    total = 0
    seen = set()
    for shard in sorted(set(weight_map.values())):
        entries, _ = read_safetensors_header(os.path.join(folder, shard))
        seen |= set(entries)
        total += sum(e.nbytes for e in entries.values())
    if seen != set(weight_map):
        raise DMergeError(f"{folder}: the shards and the index disagree; nothing pushed")
    declared = index.get("metadata", {}).get("total_size")
    if declared is not None and declared != total:
        raise DMergeError(f"{folder}: the index says {declared} bytes of tensors, the shards hold {total}; "
                          "nothing pushed")
    return len(set(weight_map.values()))


def push_to_hub(folder: str, repo_id: str, private: bool = False, api=None, quiet: bool = False) -> str:
    """Upload a finished merge folder to ``repo_id`` (created if needed); returns its URL.

    Large folders go up in several commits where the installed huggingface_hub offers it
    (``upload_large_folder``: resumable, parallel), else in one ``upload_folder`` commit.
    """
    from huggingface_hub import HfApi

    if not re.match(r"^[\w.-]+/[\w.-]+$", repo_id):
        raise DMergeError(f"--push-to-hub {repo_id!r}: expected org/name")
    verify_output(folder)
    api = api or HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ignore = ["*.partial", ".dmerge-journal.jsonl*", "DMERGE_UNFINISHED"]
    if hasattr(api, "upload_large_folder"):
        api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", private=private,
                                ignore_patterns=ignore, print_report=not quiet)
    else:
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", ignore_patterns=ignore,
                          commit_message="Upload a dmerge merge")
    return str(url)


__all__ = ["resolve_hub_model", "redirects", "RedirectCache", "push_to_hub", "verify_output", "offline"]
