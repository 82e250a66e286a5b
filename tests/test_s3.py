"""Merges from and to a real S3 API (moto's server on 127.0.0.1, behind a proxy that
counts bytes and injects faults): byte-identical to local merges, each parent byte
fetched as often as the method needs, transient failures survived, interrupted uploads
resumed and failed ones aborted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from conftest import TIES, shard_bytes, write_recipe
from dmerge.toymodels import LlamaShape, write_family
from s3stand import S3Stand

# ~29 MiB per model: big enough for several 5 MiB upload parts per shard
SHAPE = LlamaShape(hidden=512, layers=4, intermediate=1376, heads=8, kv_heads=2, vocab=4096)

LINEAR = """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.4}}
dtype: bfloat16
"""

HALF_PASSTHROUGH = """
merge_method: passthrough
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 2]
dtype: bfloat16
"""

SHARDING = ["--out-shard-size", "12M", "--chunk-size", "2M"]


@pytest.fixture(scope="module")
def stand():
    s = S3Stand()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def s3_family(stand, tmp_path_factory):
    """The family on local disk and in s3://models/, and an s3fs through the proxy."""
    root = str(tmp_path_factory.mktemp("s3family"))
    folders = dict(zip(["base", "ft1", "ft2"], write_family(root, SHAPE, n_fine_tunes=2, shard_bytes=12_000_000)))
    client = stand.boto()
    client.create_bucket(Bucket="models")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **stand.options())
    for name, folder in folders.items():
        fs.put(folder, f"models/{name}", recursive=True)
    urls = {name: f"s3://models/{name}" for name in folders}
    return folders, urls, fs


@pytest.fixture(scope="module")
def local_merges(stand, s3_family, tmp_path_factory):
    """The ties and linear merges of the local family with the tests' sharding: what every
    bucket output must equal, merged once."""
    folders = s3_family[0]
    root = tmp_path_factory.mktemp("local-merges")
    out = {}
    for name, template in (("ties", TIES), ("linear", LINEAR)):
        out[name] = str(root / name)
        _merge([write_recipe(root / f"{name}.yml", template.format(**folders)), out[name], *SHARDING], stand)
    return out


def _merge(args: list[str], stand: S3Stand) -> None:
    from click.testing import CliRunner

    from dmerge.cli import main

    result = CliRunner().invoke(main, ["run", *args, "--quiet", "--storage-options",
                                       json.dumps({"s3": stand.options()})], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _bucket(stand: S3Stand, name: str) -> None:
    try:
        stand.boto().create_bucket(Bucket=name)
    except Exception as e:  # noqa: BLE001
        if "BucketAlreadyOwnedByYou" not in str(e):
            raise


def _objects(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {os.path.basename(p): fs.cat_file(p) for p in fs.ls(prefix, detail=False)}


def _assert_same_weights(got: dict[str, bytes], local: str) -> None:
    """The objects ``got`` hold the shards, index and config of the local folder, byte for byte."""
    for name in os.listdir(local):
        if name.endswith(".safetensors") or name.endswith(".json"):
            assert got[name] == open(os.path.join(local, name), "rb").read(), name


def _uploads(stand: S3Stand, bucket: str) -> list[dict]:
    return stand.boto().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _tensor_bytes(folder: str, layers: range | None = None) -> int:
    """Bytes of tensor data in a local model folder (of the given layers only)."""
    from dmerge.io.model_source import open_model

    model = open_model(folder)
    total = 0
    for name, loc in model.tensors.items():
        if layers is not None:
            parts = name.split(".")
            if "layers" not in parts or int(parts[parts.index("layers") + 1]) not in layers:
                continue
        total += loc.entry.nbytes
    return total


def test_bucket_to_bucket_equals_local(stand, s3_family, local_merges, tmp_path):
    folders, urls, fs = s3_family
    _bucket(stand, "out")
    local = local_merges["ties"]
    stand.reset_counts()
    _merge([write_recipe(tmp_path / "r.yml", TIES.format(**urls)), "s3://out/ties", *SHARDING], stand)
    served = stand.bytes_sent
    got = _objects(fs, "out/ties")
    want = {n: open(os.path.join(local, n), "rb").read() for n in os.listdir(local)}
    assert sorted(got) == sorted(want)  # shards, index, config, recipe, card; no marker or run file
    for name in want:
        if name not in ("README.md", "mergekit_config.yml"):  # they name the parents, which differ
            assert got[name] == want[name], name
    assert _uploads(stand, "out") == []
    # ties reads every chunk of a split tensor twice (magnitude statistics, then the
    # merge) and some a third time; the statistic passes keep what they fetched on local
    # disk, so the store sends each parent byte once
    parents = sum(_tensor_bytes(folders[k]) for k in ("base", "ft1", "ft2"))
    assert parents <= served <= 1.03 * parents


def test_without_the_spill_two_pass_methods_fetch_again(stand, s3_family, tmp_path, monkeypatch):
    from dmerge.io.spill import spill

    folders, urls, fs = s3_family
    monkeypatch.setattr(spill, "_budget", 0)
    stand.reset_counts()
    _merge([write_recipe(tmp_path / "r.yml", TIES.format(**urls)), str(tmp_path / "out"), *SHARDING], stand)
    parents = sum(_tensor_bytes(folders[k]) for k in ("base", "ft1", "ft2"))
    assert 1.8 * parents <= stand.bytes_sent <= 3.05 * parents


def test_one_pass_reads_each_byte_once(stand, s3_family, tmp_path):
    folders, urls, fs = s3_family
    _bucket(stand, "out")
    stand.reset_counts()
    _merge([write_recipe(tmp_path / "lin.yml", LINEAR.format(**urls)), str(tmp_path / "lin"), *SHARDING], stand)
    needed = sum(_tensor_bytes(folders[k]) for k in ("ft1", "ft2"))
    assert needed <= stand.bytes_sent <= 1.03 * needed  # + headers, configs, indexes
    assert shard_bytes(str(tmp_path / "lin"))  # wrote something

    stand.reset_counts()
    _merge([write_recipe(tmp_path / "half.yml", HALF_PASSTHROUGH.format(**urls)), "s3://out/half",
            *SHARDING], stand)
    half = _tensor_bytes(folders["ft1"], range(0, 2))
    # half the layers, and the embeddings/norms the output keeps
    embeds = _tensor_bytes(folders["ft1"]) - _tensor_bytes(folders["ft1"], range(0, 4))
    assert half + embeds <= stand.bytes_sent <= 1.03 * (half + embeds)
    assert stand.bytes_sent < 0.75 * _tensor_bytes(folders["ft1"])


def test_transient_faults_still_give_identical_bytes(stand, s3_family, local_merges, tmp_path):
    folders, urls, fs = s3_family
    _bucket(stand, "out")
    local = local_merges["linear"]
    stand.reset_counts()
    stand.faults, stand.fault_every = ["503", "cut", "short"], 10
    try:
        _merge([write_recipe(tmp_path / "r.yml", LINEAR.format(**urls)), "s3://out/faulty", *SHARDING], stand)
    finally:
        injected = stand.faults_injected
        stand.faults, stand.fault_every = [], 0
    assert injected >= 6  # every kind, more than once
    got = _objects(fs, "out/faulty")
    _assert_same_weights(got, local)


def test_permanent_error_names_the_object_and_aborts_uploads(stand, s3_family, tmp_path):
    folders, urls, fs = s3_family
    _bucket(stand, "failing")
    from click.testing import CliRunner

    from dmerge.cli import main

    stand.faults, stand.fault_every = ["403"], 5
    try:
        result = CliRunner().invoke(main, ["run", write_recipe(tmp_path / "r.yml", LINEAR.format(**urls)),
                                           "s3://failing/merged", "--quiet", *SHARDING, "--storage-options",
                                           json.dumps({"s3": stand.options()})])
    finally:
        stand.faults, stand.fault_every = [], 0
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "access denied" in lines[0] and "s3://models/ft" in lines[0], result.output
    assert _uploads(stand, "failing") == []  # nothing left to bill
    fs.invalidate_cache()
    assert not fs.exists("failing/merged/model.safetensors.index.json")
    assert not fs.exists("failing/merged/.dmerge-run.json")


def test_missing_object_is_one_clear_error(stand, s3_family, tmp_path):
    from click.testing import CliRunner

    from dmerge.cli import main

    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(ft1="s3://models/ft1", ft2="s3://models/nothing-here"))
    result = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "o"), "--quiet", "--storage-options",
                                       json.dumps({"s3": stand.options()})])
    assert result.exit_code == 1
    assert "s3://models/nothing-here" in result.output and "not found" in result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1


def test_storage_options_reach_process_workers(stand, s3_family, local_merges, tmp_path):
    """Workers in other processes get the endpoint and keys from --storage-options alone
    (the environment has none)."""
    folders, urls, fs = s3_family
    _bucket(stand, "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(**urls))
    proc = subprocess.run([sys.executable, "-m", "dmerge.cli", "run", recipe, "s3://out/procs", "--quiet",
                           "--processes", "--workers", "2", "--threads-per-worker", "1", *SHARDING,
                           "--storage-options", json.dumps(stand.options())],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_same_weights(_objects(fs, "out/procs"), local_merges["linear"])


def test_killed_upload_leaves_no_complete_output_then_resumes(stand, s3_family, local_merges, tmp_path):
    folders, urls, fs = s3_family
    _bucket(stand, "resume")
    recipe = write_recipe(tmp_path / "r.yml", TIES.format(**urls))
    options = json.dumps({"s3": stand.options()})
    cmd = [sys.executable, "-m", "dmerge.cli", "run", recipe, "s3://resume/merged", "--quiet", *SHARDING,
           "--storage-options", options]
    client = stand.boto()
    stand.delay_s = 0.05  # a slow store: the merge is still running when it is killed
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        uploaded = 0
        while time.time() < deadline and proc.poll() is None:
            uploads = client.list_multipart_uploads(Bucket="resume").get("Uploads", [])
            uploaded = sum(len(client.list_parts(Bucket="resume", Key=u["Key"], UploadId=u["UploadId"])
                               .get("Parts", [])) for u in uploads)
            if uploaded >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        stand.delay_s = 0.0
    assert uploaded >= 2
    fs.invalidate_cache()
    names = {os.path.basename(p) for p in fs.ls("resume/merged", detail=False)}
    assert "model.safetensors.index.json" not in names
    assert not any(n.endswith(".safetensors") for n in names)  # no shard exists before completion
    assert {"DMERGE_UNFINISHED", ".dmerge-run.json"} <= names
    run = json.loads(fs.cat_file("resume/merged/.dmerge-run.json"))
    marker = fs.cat_file("resume/merged/DMERGE_UNFINISHED").decode()
    # the note says how to resume, without the credentials given on the command line
    assert "--resume" in marker and "<the same storage options>" in marker and '"secret"' not in marker
    pending = {(u["Key"], u["UploadId"]) for u in client.list_multipart_uploads(Bucket="resume").get("Uploads", [])}
    # every upload left is one the run file records: none dangles unknown
    assert pending == {(f"merged/{name}", uid) for name, uid in run["uploads"].items()}

    # without --resume (or --overwrite) the unfinished merge is refused
    from click.testing import CliRunner

    from dmerge.cli import main

    refused = CliRunner().invoke(main, ["run", recipe, "s3://resume/merged", "--quiet", *SHARDING,
                                        "--storage-options", options])
    assert refused.exit_code == 1 and "--resume" in refused.output

    stand.reset_counts()
    _merge([recipe, "s3://resume/merged", *SHARDING, "--resume"], stand)
    assert client.list_multipart_uploads(Bucket="resume").get("Uploads", []) == []
    got = _objects(fs, "resume/merged")
    assert "DMERGE_UNFINISHED" not in got and ".dmerge-run.json" not in got
    _assert_same_weights(got, local_merges["ties"])


def test_resume_keeps_the_shards_completed_before_the_interruption(stand, s3_family, local_merges, tmp_path,
                                                                  monkeypatch):
    """Stopped while completing the uploads (after the first shard's), --resume neither
    uploads that shard again nor loses it."""
    from click.testing import CliRunner

    from dmerge.cli import main
    from dmerge.io import object_output

    folders, urls, fs = s3_family
    _bucket(stand, "completing")
    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(**urls))
    options = json.dumps({"s3": stand.options()})
    complete = object_output.ObjectOutput._s3

    def interrupted_after_one(self, method, what, **kwargs):
        if method == "complete_multipart_upload" and self.completed:
            raise KeyboardInterrupt  # as Ctrl-C would, between two shards
        return complete(self, method, what, **kwargs)

    monkeypatch.setattr(object_output.ObjectOutput, "_s3", interrupted_after_one)
    stopped = CliRunner().invoke(main, ["run", recipe, "s3://completing/m", "--quiet", *SHARDING,
                                        "--storage-options", options])
    assert stopped.exit_code == 130, stopped.output  # as after Ctrl-C
    monkeypatch.setattr(object_output.ObjectOutput, "_s3", complete)
    run = json.loads(fs.cat_file("completing/m/.dmerge-run.json"))
    assert len(run["completed"]) == 1 and len(run["uploads"]) >= 1
    fs.invalidate_cache()
    assert not fs.exists("completing/m/model.safetensors.index.json")

    stand.reset_counts()
    _merge([recipe, "s3://completing/m", *SHARDING, "--resume"], stand)
    assert stand.requests.get("PUT part", 0) == 0  # every part was there: nothing uploaded again
    assert _uploads(stand, "completing") == []
    _assert_same_weights(_objects(fs, "completing/m"), local_merges["linear"])


def test_storage_options_from_a_yaml_file(stand, s3_family, tmp_path):
    from click.testing import CliRunner

    from dmerge.cli import main

    folders, urls, fs = s3_family
    options = tmp_path / "s3.yml"
    options.write_text("s3:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in stand.options().items()))
    result = CliRunner().invoke(main, ["plan", write_recipe(tmp_path / "r.yml", LINEAR.format(**urls)),
                                       "--storage-options", str(options)])
    assert result.exit_code == 0, result.output
    assert "output tensors" in result.output
    bad = CliRunner().invoke(main, ["plan", str(tmp_path / "r.yml"), "--storage-options", str(tmp_path / "none.yml")])
    assert bad.exit_code == 1 and "cannot read" in bad.output


def test_storage_options_for_a_backend_not_installed_is_one_line(tmp_path, family):
    from click.testing import CliRunner

    from dmerge.cli import main

    recipe = write_recipe(tmp_path / "r.yml", LINEAR.format(ft1=family["ft1"], ft2=family["ft2"]))
    result = CliRunner().invoke(main, ["run", recipe, "nosuchscheme://x/y", "--storage-options", '{"key": "k"}'])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --storage-options for nosuchscheme://"), result.output
