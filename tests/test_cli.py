"""The command line as users call it: demo, dmerge-yaml alias, options."""

from __future__ import annotations

import os
import subprocess
import sys

import click
from click.testing import CliRunner

from conftest import load_folder, write_recipe
from dmerge.cli import main, mergekit_yaml


def test_demo_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "logits finite: True" in result.output
    assert os.path.exists(tmp_path / "demo" / "merged" / "model.safetensors.index.json")
    # quiet: no progress bar, neither dmerge's nor transformers' ("Loading weights")
    assert result.stderr == "", result.stderr
    from transformers.utils import logging as tf_logging

    assert tf_logging.is_progress_bar_enabled()  # restored afterwards


def test_demo_output_is_ignored_by_git():
    with open(os.path.join(os.path.dirname(__file__), "..", ".gitignore")) as f:
        assert "/dmerge-demo/" in f.read().split()


def _commands():
    return [mergekit_yaml] + list(main.commands.values())


def test_every_option_has_help():
    for command in _commands():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{command.name} {param.opts[0]} has no help"


def test_help_says_which_size_units():
    for command in (main.commands["run"], main.commands["plan"], mergekit_yaml):
        text = " ".join(command.get_help(click.Context(command)).split())
        assert "K/M/G/T = KiB/MiB/GiB/TiB" in text and "KB/MB/GB/TB = powers of 1000" in text and "5B" in text


def test_chunk_size_prints_back_as_typed(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 1.0}}
  - model: {family['ft2']}
    parameters: {{weight: 1.0}}
""")
    for typed, shown in (("128M", "128 MiB"), ("64K", "64 KiB"), ("100MB", "95.4 MiB")):
        result = CliRunner().invoke(main, ["plan", recipe, "--chunk-size", typed])
        assert result.exit_code == 0, result.output
        assert f"chunk budget {shown}," in result.output


def test_memory_limit_uses_dmerge_units():
    run = main.commands["run"]
    for typed, value in (("4G", 4 << 30), ("4GB", 4_000_000_000), ("auto", "auto"), ("0.5", "0.5"), ("2000000", "2000000")):
        with run.make_context("run", ["r.yml", "out", "--memory-limit", typed]) as ctx:
            assert ctx.params["memory_limit"] == value
    result = CliRunner().invoke(main, ["run", "r.yml", "out", "--memory-limit", "lots"])
    assert result.exit_code == 2 and "cannot parse size 'lots'" in result.output


def test_dmerge_yaml_alias_takes_mergekit_arguments(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 1.0}}
  - model: {family['ft2']}
    parameters: {{weight: 1.0}}
""")
    args = [recipe, str(tmp_path / "out"), "--cuda", "--lazy-unpickle", "--allow-crimes", "--out-shard-size", "1B",
            "--no-copy-tokenizer", "--quiet"]
    result = CliRunner().invoke(mergekit_yaml, args)
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in os.listdir(tmp_path / "out")  # one shard: unsharded name
    assert len(load_folder(str(tmp_path / "out"))) == len(load_folder(family["ft1"]))


def test_console_script_reports_bad_size():
    result = CliRunner().invoke(main, ["run", "r.yml", "out", "--chunk-size", "lots"])
    assert result.exit_code == 2 and "cannot parse size 'lots'" in result.output


def test_methods_lists_registered():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    assert "linear" in result.output and "task_arithmetic" in result.output and "weight" in result.output


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "dmerge.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "plan" in out.stdout


def test_recipe_warning_prints_as_one_clean_line(family, tmp_path):
    """A warning names the recipe key and line, not dmerge's source file."""
    recipe = write_recipe(tmp_path / "r.yml", f"""merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {family['ft2']}
    parameters: {{weight: 1.0}}
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "dmerge.cli", "plan", recipe], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["warning: models[0].parameters.density (line 4): linear ignores 'density'"]


def test_methods_shows_descriptions_defaults_and_per_model_parameters():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    ties = lines.index("ties (needs base_model): Trim each task vector to its largest magnitudes, elect a sign per "
                       "element, average the agreeing ones.")
    params = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[ties + 1:ties + 7]}
    assert params["density"].startswith("per model (not base), default 1 ")
    assert params["weight"].startswith("per model (not base), required ")
    assert params["normalize"].startswith("shared, default true ")
    assert "linear: Weighted sum of all sources (the base model too, if it has a weight)." in lines
    assert any(line.split()[:4] == ["weight", "per", "model,", "required"] for line in lines)  # linear's: base too
    assert any(line.split()[:3] == ["scale", "per", "model,"] and "optional" in line for line in lines)


def test_cluster_line_names_what_runs(family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", f"""
merge_method: linear
models:
  - model: {family['ft1']}
    parameters: {{weight: 1.0}}
  - model: {family['ft2']}
    parameters: {{weight: 1.0}}
""")
    procs = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "p"), "--processes", "--workers", "2",
                                      "--threads-per-worker", "1"])
    assert procs.exit_code == 0, procs.output
    assert "local cluster (2 worker processes x 1 thread)" in procs.stderr
    workers = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "w"), "--workers", "1"])
    assert "local cluster (in-process, 1 worker x " in workers.stderr
    threads = CliRunner().invoke(main, ["run", recipe, str(tmp_path / "t"), "--threads-per-worker", "2"])
    assert threads.exit_code == 0, threads.output
    assert "running in this process on 2 threads (no cluster" in threads.stderr
    assert "dask:" not in threads.stderr
