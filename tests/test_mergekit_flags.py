"""Every mergekit-yaml 0.1.5 flag is accepted by dmerge-yaml and does what MERGEKIT_FLAGS says.

The flags are read from mergekit's own click command when mergekit is installed, so a
flag added there fails here until dmerge handles it; otherwise from a copy of 0.1.5's.
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from conftest import load_folder, write_recipe
from dmerge.cli import MERGEKIT_FLAGS, main, mergekit_yaml, translate_mergekit_flags

# mergekit-yaml 0.1.5's flags (mergekit/options.py, add_merge_options over MergeOptions).
MERGEKIT_0_1_5_FLAGS = [
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
    "--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--cuda", "--no-cuda", "--device",
    "--low-cpu-memory", "--no-low-cpu-memory", "--out-shard-size", "--copy-tokenizer", "--no-copy-tokenizer",
    "--clone-tensors", "--no-clone-tensors", "--trust-remote-code", "--no-trust-remote-code", "--random-seed",
    "--lazy-unpickle", "--no-lazy-unpickle", "--write-model-card", "--no-write-model-card", "--safe-serialization",
    "--no-safe-serialization", "-v", "--quiet", "--no-quiet", "--read-to-gpu", "--no-read-to-gpu", "--multi-gpu",
    "--no-multi-gpu", "--num-threads", "-j", "--gpu-rich", "--async-write", "--no-async-write", "--write-threads",
]
MERGEKIT_0_1_5_FIELDS = {
    "allow_crimes", "unsafe_truncate_embeddings", "transformers_cache", "lora_merge_cache", "lora_merge_dtype", "cuda",
    "device", "low_cpu_memory", "out_shard_size", "copy_tokenizer", "clone_tensors", "trust_remote_code",
    "random_seed", "lazy_unpickle", "write_model_card", "safe_serialization", "verbosity", "quiet", "read_to_gpu",
    "multi_gpu", "num_threads", "gpu_rich", "async_write", "write_threads",
}


def _mergekit_command():
    try:
        from mergekit.scripts.run_yaml import main as mergekit_main
    except Exception:  # not installed, or broken: use the copy above
        return None
    return mergekit_main


def mergekit_flags() -> list[str]:
    """mergekit-yaml's flags from the installed mergekit, else 0.1.5's."""
    command = _mergekit_command()
    if command is None:
        return MERGEKIT_0_1_5_FLAGS
    return [flag for p in command.params if p.param_type_name == "option" for flag in p.opts + p.secondary_opts]


N_CORES = os.cpu_count() or 1
SEVERAL_GPUS = "one GPU per worker process"

# flag: (command-line arguments, options it must produce, note it must print or None)
EXPECTED = {
    "--allow-crimes": (["--allow-crimes"], {"allow_crimes": True}, None),
    "--no-allow-crimes": (["--no-allow-crimes"], {"allow_crimes": False}, None),
    "--unsafe-truncate-embeddings": (["--unsafe-truncate-embeddings"], {"unsafe_truncate_embeddings": True}, None),
    "--no-unsafe-truncate-embeddings": (["--no-unsafe-truncate-embeddings"], {"unsafe_truncate_embeddings": False}, None),
    "--transformers-cache": (["--transformers-cache", "/tmp/hf"], {},
                             "note: --transformers-cache /tmp/hf has no effect: dmerge reads Hub models by byte range"),
    "--lora-merge-cache": (["--lora-merge-cache", "/tmp/lora"], {},
                           "note: --lora-merge-cache /tmp/lora has no effect: dmerge does not apply LoRA adapters"),
    "--lora-merge-dtype": (["--lora-merge-dtype", "bfloat16"], {},
                           "note: --lora-merge-dtype bfloat16 has no effect: dmerge does not apply LoRA adapters"),
    "--cuda": (["--cuda"], {"cuda": True}, None),
    "--no-cuda": (["--no-cuda"], {"cuda": False}, None),
    "--device": (["--device", "cuda"], {"cuda": True}, None),
    "--low-cpu-memory": (["--low-cpu-memory"], {}, "note: --low-cpu-memory has no effect: dmerge holds only"),
    "--no-low-cpu-memory": (["--no-low-cpu-memory"], {}, None),
    "--out-shard-size": (["--out-shard-size", "2B"], {"out_shard_size": 2_000_000_000}, None),
    "--copy-tokenizer": (["--copy-tokenizer"], {"copy_tokenizer": True}, None),
    "--no-copy-tokenizer": (["--no-copy-tokenizer"], {"copy_tokenizer": False}, None),
    "--clone-tensors": (["--clone-tensors"], {}, "note: --clone-tensors has no effect: dmerge writes every output"),
    "--no-clone-tensors": (["--no-clone-tensors"], {}, None),
    "--trust-remote-code": (["--trust-remote-code"], {"trust_remote_code": True}, None),
    "--no-trust-remote-code": (["--no-trust-remote-code"], {"trust_remote_code": False}, None),
    "--random-seed": (["--random-seed", "7"], {"random_seed": 7}, None),
    "--lazy-unpickle": (["--lazy-unpickle"], {},
                        "note: --lazy-unpickle has no effect: dmerge reads safetensors by byte range"),
    "--no-lazy-unpickle": (["--no-lazy-unpickle"], {}, None),
    "--write-model-card": (["--write-model-card"], {"write_model_card": True}, None),
    "--no-write-model-card": (["--no-write-model-card"], {"write_model_card": False}, None),
    "--safe-serialization": (["--safe-serialization"], {}, None),
    "--no-safe-serialization": (["--no-safe-serialization"], {},
                                "note: --no-safe-serialization has no effect: dmerge writes safetensors regardless"),
    "-v": (["-v"], {"verbosity": 1}, None),
    "--quiet": (["--quiet"], {"quiet": True}, None),
    "--no-quiet": (["--no-quiet"], {"quiet": False}, None),
    "--read-to-gpu": (["--read-to-gpu"], {"cuda": True}, None),
    "--no-read-to-gpu": (["--no-read-to-gpu"], {"cuda": False}, None),
    "--multi-gpu": (["--multi-gpu"], {"cuda": True}, f"note: --multi-gpu: dmerge uses {SEVERAL_GPUS}"),
    "--no-multi-gpu": (["--no-multi-gpu"], {"cuda": False}, None),
    "--num-threads": (["--num-threads", "3"], {"threads_per_worker": 3}, None),
    "-j": (["-j", "3"], {"threads_per_worker": 3}, None),
    "--gpu-rich": (["--gpu-rich"], {"cuda": True}, f"note: --gpu-rich: dmerge uses {SEVERAL_GPUS}"),
    "--async-write": (["--async-write"], {}, "note: --async-write has no effect: dmerge's tasks write"),
    "--no-async-write": (["--no-async-write"], {}, None),
    "--write-threads": (["--write-threads", "1000"], {"threads_per_worker": max(N_CORES, 1000)}, None),
}


def parse(command, args: list[str]) -> dict:
    """The parameters ``command`` parses from ``RECIPE OUT args`` (nothing runs)."""
    with command.make_context(command.name, ["r.yml", "out", *args]) as ctx:
        return dict(ctx.params)


def test_the_copied_flag_list_is_mergekit_0_1_5s():
    command = _mergekit_command()
    if command is None:
        pytest.skip("mergekit not installed")
    from importlib.metadata import version

    if version("mergekit") != "0.1.5":
        pytest.skip("another mergekit version")
    assert mergekit_flags() == MERGEKIT_0_1_5_FLAGS
    assert {p.name for p in command.params if p.param_type_name == "option"} == MERGEKIT_0_1_5_FIELDS


def test_the_table_covers_every_mergekit_option():
    from mergekit.options import MergeOptions

    assert set(MergeOptions.model_fields) == set(MERGEKIT_FLAGS)


@pytest.mark.parametrize("flag", mergekit_flags())
@pytest.mark.parametrize("command", [mergekit_yaml, main.commands["run"]], ids=["dmerge-yaml", "run"])
def test_every_mergekit_yaml_flag_is_accepted(command, flag):
    assert flag in EXPECTED, f"mergekit-yaml has a flag dmerge does not handle: {flag}"
    args, expected, note = EXPECTED[flag]
    options, notes = translate_mergekit_flags(parse(command, args))
    for key, value in expected.items():
        assert options[key] == value, (key, options[key])
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(note) and "\n" not in notes[0]


def test_mergekit_only_flags_leave_dmerge_options():
    options, _ = translate_mergekit_flags(parse(mergekit_yaml, ["--lazy-unpickle", "--device", "cpu", "-j", "2"]))
    assert not {"lazy_unpickle", "device", "num_threads", "write_threads", "gpu_rich"} & set(options)


@pytest.mark.parametrize("args,cuda,note", [
    (["--device", "cpu", "--cuda"], False, None),  # an explicit --device wins, as in mergekit
    (["--device", "cpu", "--gpu-rich"], False, None),
    (["--device", "cuda:0"], True, None),
    (["--device", "cuda:1"], True, "set CUDA_VISIBLE_DEVICES=1"),
    (["--device", "mps"], False, "note: --device mps is not supported by dmerge: computing on CPU"),
])
def test_device(args, cuda, note):
    options, notes = translate_mergekit_flags(parse(mergekit_yaml, args))
    assert options["cuda"] is cuda
    assert (notes == []) if note is None else (len(notes) == 1 and note in notes[0])


def test_device_auto_follows_the_machine():
    import torch

    options, notes = translate_mergekit_flags(parse(mergekit_yaml, ["--device", "auto"]))
    assert options["cuda"] is torch.cuda.is_available() and notes == []


@pytest.mark.parametrize("args,threads,notes", [
    (["-j", "5", "--workers", "2"], 3, []),  # 5 threads in all over 2 workers: 3 each
    (["-j", "2", "--write-threads", "6"], 6, []),
    (["--write-threads", "1"], N_CORES, []),
    (["-j", "2", "--threads-per-worker", "4"], 4, ["note: --num-threads 2 has no effect with --threads-per-worker"]),
    (["--write-threads", "8", "--scheduler", "tcp://h:8786"], None,
     ["note: --write-threads 8 has no effect with --scheduler"]),
])
def test_threads(args, threads, notes):
    options, printed = translate_mergekit_flags(parse(mergekit_yaml, args))
    assert options["threads_per_worker"] == threads and printed == notes


def test_dmerge_yaml_runs_with_every_flag_kind(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 0.5}}
  - model: {family['ft2']}
    parameters: {{weight: 0.5}}
""")
    args = [recipe, str(tmp_path / "out"), "--lazy-unpickle", "--low-cpu-memory", "--clone-tensors",
            "--no-safe-serialization", "--async-write", "--write-threads", "2", "-j", "2", "--transformers-cache",
            str(tmp_path / "cache"), "--lora-merge-cache", str(tmp_path / "lora"), "--lora-merge-dtype", "float16",
            "--device", "cpu", "--no-read-to-gpu", "--random-seed", "3", "--out-shard-size", "1B", "--allow-crimes",
            "--no-copy-tokenizer", "--write-model-card", "--trust-remote-code", "--quiet"]
    result = CliRunner().invoke(mergekit_yaml, args)
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert len(notes) == 8 and all(n.startswith("note: ") and "has no effect" in n for n in notes), notes
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors",
                                                     "model.safetensors.index.json"]
    assert len(load_folder(str(tmp_path / "out"))) == len(load_folder(family["ft1"]))


@pytest.mark.parametrize("flag,trusted", [("--trust-remote-code", True), ("--no-trust-remote-code", False)])
def test_trust_remote_code_reaches_every_tokenizer_load(tmp_path, monkeypatch, flag, trusted):
    transformers = pytest.importorskip("transformers")
    from dmerge.toymodels import LlamaShape, random_weights, write_model, write_wordlevel_tokenizer

    shape = LlamaShape(hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, vocab=16)
    folders = []
    for i, words in enumerate((["a", "b", "c"], ["a", "b", "d"])):
        folder = write_model(str(tmp_path / f"m{i}"), random_weights(shape, i), shape.config("bfloat16"))
        write_wordlevel_tokenizer(folder, words)
        folders.append(folder)
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {folders[0]}
    parameters: {{weight: 0.5}}
  - model: {folders[1]}
    parameters: {{weight: 0.5}}
tokenizer_source: union
chat_template: auto
""")
    seen = []
    original = transformers.AutoTokenizer.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(recording))
    result = CliRunner().invoke(mergekit_yaml, [recipe, str(tmp_path / "out"), flag, "--quiet"])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {trusted}
