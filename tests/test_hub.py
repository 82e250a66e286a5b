"""Hub models: bare ids resolved from the local HF cache (offline), ranged reads through a
cached redirect target, and pushing a finished merge."""

from __future__ import annotations

import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants  # read its environment now, not under a test's HF_HUB_OFFLINE
import pytest
from click.testing import CliRunner

from conftest import TIES, shard_bytes, write_recipe
from dmerge.cli import main
from dmerge.errors import DMergeError
from dmerge.io import hub, storage

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(root, family, names=("base", "ft1", "ft2"), skip: str | None = None) -> str:
    """A HF cache folder holding the family as org/<name> at COMMIT, as huggingface_hub
    lays it out (refs/main -> snapshots/<commit>/files)."""
    hub_dir = os.path.join(str(root), "hub")
    for name in names:
        repo = os.path.join(hub_dir, f"models--org--{name}")
        snap = os.path.join(repo, "snapshots", COMMIT)
        os.makedirs(snap, exist_ok=True)
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(COMMIT)
        for fname in os.listdir(family[name]):
            if fname != skip:
                shutil.copy(os.path.join(family[name], fname), os.path.join(snap, fname))
    return hub_dir


def _run(args, env):
    return CliRunner(env=env).invoke(main, ["run", *args, "--quiet"])


def test_bare_hub_ids_resolve_offline_from_the_cache(family, tmp_path):
    hub_dir = _cache(tmp_path / "hf", family)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub_dir}
    ids = {"base": "org/base", "ft1": "org/ft1", "ft2": f"org/ft2@{COMMIT}"}
    result = _run([write_recipe(tmp_path / "hub.yml", TIES.format(**ids)), str(tmp_path / "from-hub")], env)
    assert result.exit_code == 0, result.output
    local = tmp_path / "local"
    assert _run([write_recipe(tmp_path / "local.yml", TIES.format(**family)), str(local)], {}).exit_code == 0
    assert shard_bytes(str(tmp_path / "from-hub")) == shard_bytes(str(local))


def test_offline_model_missing_from_cache_is_one_clear_error(family, tmp_path):
    any_shard = sorted(f for f in os.listdir(family["ft1"]) if f.endswith(".safetensors"))[0]
    hub_dir = _cache(tmp_path / "hf", family, names=("ft1",), skip=any_shard)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub_dir}
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(base="org/base", ft1="org/ft1", ft2="org/ft1"))
    result = _run([recipe, str(tmp_path / "out")], env)
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0]
    assert "org/ft1 is only partly in" in lines[0] or "org/base is not in" in lines[0]
    assert not os.path.exists(tmp_path / "out")


class FakeHub:
    """``/org/name/resolve/<rev>/<file>`` answers 302 to a signed-looking ``/cdn/<sig>/``
    URL serving the file with Range support; ``expire()`` makes old signatures 403."""

    def __init__(self, folder: str):
        self.folder = folder
        self.resolves = 0
        self.cdn_gets = 0
        self.signature = 1
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, code, body=b"", headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                parts = self.path.split("/")
                if "resolve" in parts:
                    fake.resolves += 1
                    name = parts[-1]
                    target = f"http://127.0.0.1:{fake.port}/cdn/{fake.signature}/{name}"
                    size = os.path.getsize(os.path.join(fake.folder, name))
                    return self._reply(302, headers=[("Location", target), ("X-Linked-Size", str(size)),
                                                     ("X-Repo-Commit", COMMIT), ("ETag", '"e"')])
                if parts[1] == "cdn":
                    if int(parts[2]) != fake.signature:
                        return self._reply(403, b"expired")
                    with open(os.path.join(fake.folder, parts[3]), "rb") as f:
                        data = f.read()
                    if "Range" not in self.headers:  # a HEAD following the redirect
                        return self._reply(200, data)
                    fake.cdn_gets += 1
                    a, b = self.headers["Range"].removeprefix("bytes=").split("-")
                    return self._reply(206, data[int(a):int(b) + 1])
                self._reply(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def expire(self):
        self.signature += 1

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_ranged_reads_reuse_the_resolved_redirect(family, tmp_path, monkeypatch):
    fake = FakeHub(family["ft1"])
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{fake.port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "redirects", hub.RedirectCache())
    try:
        name = sorted(f for f in os.listdir(family["ft1"]) if f.endswith(".safetensors"))[0]
        data = open(os.path.join(family["ft1"], name), "rb").read()
        url = f"hf://org/ft1/{name}"
        for start in (0, 100, 1000, 5000):
            assert bytes(storage.read_range(url, start, 64)) == data[start:start + 64]
        assert fake.resolves == 1 and fake.cdn_gets == 4  # one resolve, every range from the target
        fake.expire()  # the signed target expires: resolved again once, bytes still right
        assert bytes(storage.read_range(url, 2000, 128)) == data[2000:2128]
        assert fake.resolves == 2
    finally:
        fake.stop()


class StandInHub:
    """Records what push_to_hub asks of huggingface_hub's HfApi."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        self.files = sorted(os.listdir(kw["folder_path"]))


def test_push_to_hub_uploads_a_verified_folder(family, tmp_path):
    out = tmp_path / "merged"
    assert _run([write_recipe(tmp_path / "r.yml", TIES.format(**family)), str(out)], {}).exit_code == 0
    api = StandInHub()
    url = hub.push_to_hub(str(out), "me/merged", private=True, api=api)
    assert url == "https://huggingface.co/me/merged"
    assert api.calls[0][0] == "create_repo" and api.calls[0][2]["private"] is True
    assert api.calls[1][0] == "upload_folder" and api.calls[1][2]["folder_path"] == str(out)

    # a folder that is not a finished merge is refused before anything is created
    os.remove(out / "model.safetensors.index.json")
    api = StandInHub()
    with pytest.raises(DMergeError, match="not a finished merge"):
        hub.push_to_hub(str(out), "me/merged", api=api)
    assert api.calls == []


def test_run_push_to_hub_flag(family, tmp_path, monkeypatch):
    import huggingface_hub

    made = []

    class Api(StandInHub):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["run", write_recipe(tmp_path / "r.yml", TIES.format(**family)), str(out),
                                       "--push-to-hub", "me/soup", "--private"])
    assert result.exit_code == 0, result.output
    assert "pushed to https://huggingface.co/me/soup" in result.output
    (api,) = made
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert "model.safetensors.index.json" in api.files and "DMERGE_UNFINISHED" not in api.files
