"""Time `dmerge moe` against `mergekit-moe` on the same FrankenMoE recipe, same machine, one run.

A family of base + 3 fine-tunes (read only; e.g. the ~1.6 GB family bench_merge.py
writes) becomes a 3-expert Mixtral with ``hidden`` gates. The base folder is linked
into the work folder beside a word-level tokenizer (the generated families have none,
and both tools tokenize the prompts with the base's tokenizer). Both tools run as
subprocesses; the summed resident memory of each process tree is sampled every 20 ms
(bench_merge.measure). The hidden pass alone (embed + one task per decoder layer, in
one fresh process) is measured too, for its own peak.

    python benchmarks/bench_moe.py --family bench-work/1.6gb --workdir /tmp/moe-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_merge import measure, warm  # noqa: E402

from dmerge.toymodels import write_wordlevel_tokenizer  # noqa: E402

RECIPE = """base_model: {base}
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: {ft1}
    positive_prompts: ["w10 w11 w12 w13 w14 w15", "w16 w17 w18 w19", "w20 w21 w22 w23 w24 w25 w26"]
  - source_model: {ft2}
    positive_prompts: ["w100 w101 w102 w103", "w104 w105 w106 w107 w108", "w109 w110 w111"]
    negative_prompts: ["w10 w11 w12"]
  - source_model: {ft3}
    positive_prompts: ["w500 w501 w502 w503 w504", "w505 w506", "w507 w508 w509 w510 w511 w512"]
"""

HIDDEN_PASS = """
import sys
import torch
torch.set_num_threads(1)  # as a task of dmerge's local cluster (2 task threads x 1 torch thread)
from dmerge.moe.hidden import embed_prompts, run_layer
from dmerge.moe.plan import build_moe_plan
from dmerge.moe.recipe import load_moe_recipe
plan = build_moe_plan(load_moe_recipe(sys.argv[1]))
rp = plan.computations[0]
state = embed_prompts(rp)
for i in range(rp.n_layers):
    state = run_layer(rp, i, state)
"""


def prepare(family: str, workdir: str) -> dict[str, str]:
    """base (linked, with a tokenizer) and the fine-tunes (linked) under workdir."""
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, "base")
    os.makedirs(base, exist_ok=True)
    src = os.path.abspath(os.path.join(family, "base"))
    for name in os.listdir(src):
        link = os.path.join(base, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(src, name), link)
    vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
    write_wordlevel_tokenizer(base, [f"w{i}" for i in range(vocab - 3)])
    folders = {"base": base}
    for ft in ("ft1", "ft2", "ft3"):
        folders[ft] = os.path.abspath(os.path.join(family, ft))
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, help="folder with base, ft1, ft2, ft3 (read only)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dmerge-args", default="")
    args = ap.parse_args()
    folders = prepare(args.family, args.workdir)
    recipe = os.path.join(args.workdir, "moe.yml")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(**folders))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    bindir = os.path.dirname(sys.executable)
    load = os.getloadavg()
    results = {"load_before": load}
    runs = {
        "dmerge moe": [sys.executable, "-m", "dmerge.cli", "moe", recipe, "OUT", "--quiet", *args.dmerge_args.split()],
        "mergekit-moe": [os.path.join(bindir, "mergekit-moe"), recipe, "OUT", "--device", "cpu"],
        "dmerge hidden pass alone": [sys.executable, "-c", HIDDEN_PASS, recipe],
    }
    for name, cmd in runs.items():
        out = os.path.join(args.workdir, "out-" + name.split()[0])
        shutil.rmtree(out, ignore_errors=True)
        warm(list(folders.values()))
        m = measure([c if c != "OUT" else out for c in cmd], env=env)
        results[name] = m
        print(f"{name:26s} {m['wall']:7.1f} s   peak RSS {m['peak_rss'] / 2**30:5.2f} GiB", file=sys.stderr)
        if name == "dmerge moe":
            report = json.load(open(os.path.join(out, "routing_report.json")))
            results["dmerge routing overall"] = report["overall"]
        shutil.rmtree(out, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
