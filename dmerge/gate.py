"""The evaluation gate of ``dmerge run --eval-gate GATE.yml``: a merge is declared done
only once its output scores well enough.

GATE.yml (paths relative to the file)::

    data:                          # evaluation files, as for `dmerge eval --data`
      - heldout/reverse.jsonl      # name: the file's stem ("reverse")
      - path: heldout/wiki.txt
        name: wiki
    checks:                        # each names a data set and at least one bound
      - data: reverse
        min: 0.6                   # the output's score must be >= 0.6
        max_drop: 0.05             # ... and at most 0.05 worse than the best parent
      - data: wiki
        max: 40                    # perplexity at most 40
    parents: all                   # models max_drop compares with: all (every model the
                                   # recipe names, the default) or a list of references
    options:                       # evaluation settings (dmerge eval's defaults otherwise)
      batch_size: 16
      max_new_tokens: 32
      stop: "\\n"

"Worse" follows the metric: lower accuracy, higher perplexity. ``max_drop`` is in the
metric's own units (accuracy points as a fraction, perplexity as a number). Without
``checks`` the gate only evaluates and records the scores.

On failure the output folder is kept but marked: a file ``EVAL_GATE_FAILED`` (JSON: the
failed checks and every score) and a section at the top of the model card; the command
exits non-zero. On success the scores go to ``eval_gate.json`` and the model card.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import yaml

from dmerge.errors import DMergeError
from dmerge.evaluate import Dataset, EvalOptions, Score, load_data

FAILED_MARKER = "EVAL_GATE_FAILED"
PASSED_FILE = "eval_gate.json"
_OPTION_KEYS = {"batch_size", "max_new_tokens", "stop", "max_length", "device", "seed"}


class EvalGateFailed(DMergeError):
    """The merged model scored below the gate; its folder is kept, marked."""


@dataclass
class Check:
    data: str
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None


@dataclass
class Gate:
    datasets: list[Dataset]
    checks: list[Check]
    parents: list[str] | None  # None: every model the recipe names
    options: EvalOptions = field(default_factory=EvalOptions)
    path: str = ""


def load_gate(path: str) -> Gate:
    """Read and validate GATE.yml; every problem is one DMergeError naming the key."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except OSError as e:
        raise DMergeError(f"cannot read eval gate {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise DMergeError(f"eval gate {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(spec, dict):
        raise DMergeError(f"eval gate {path} must be a mapping with 'data' and 'checks'")
    unknown = set(spec) - {"data", "checks", "parents", "options"}
    if unknown:
        raise DMergeError(f"eval gate {path}: unknown key {sorted(unknown)[0]!r} (known: data, checks, parents, options)")
    here = os.path.dirname(os.path.abspath(path))
    entries = spec.get("data")
    if not isinstance(entries, list) or not entries:
        raise DMergeError(f"eval gate {path}: 'data' must list at least one evaluation file")
    datasets = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"path": e}
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise DMergeError(f"eval gate {path}: data[{i}] must be a file path or a mapping with 'path'")
        from dmerge.io import storage

        p = e["path"] if storage.is_url(e["path"]) or os.path.isabs(e["path"]) else os.path.join(here, e["path"])
        datasets.append(load_data(p, e.get("name")))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise DMergeError(f"eval gate {path}: two data sets are named alike; give them distinct 'name's")
    checks = []
    for i, c in enumerate(spec.get("checks") or []):
        if not isinstance(c, dict) or c.get("data") not in names:
            raise DMergeError(f"eval gate {path}: checks[{i}].data must name one of the data sets {names}")
        bad = set(c) - {"data", "min", "max", "max_drop"}
        if bad:
            raise DMergeError(f"eval gate {path}: checks[{i}] has unknown key {sorted(bad)[0]!r} "
                              "(known: data, min, max, max_drop)")
        bounds = {k: c.get(k) for k in ("min", "max", "max_drop")}
        for k, v in bounds.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise DMergeError(f"eval gate {path}: checks[{i}].{k} must be a number, got {v!r}")
        if all(v is None for v in bounds.values()):
            raise DMergeError(f"eval gate {path}: checks[{i}] needs min, max or max_drop")
        if bounds["max_drop"] is not None and bounds["max_drop"] < 0:
            raise DMergeError(f"eval gate {path}: checks[{i}].max_drop must be >= 0")
        checks.append(Check(c["data"], **{k: (float(v) if v is not None else None) for k, v in bounds.items()}))
    parents = spec.get("parents", "all")
    if parents == "all" or parents is None:
        parents = None
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise DMergeError(f"eval gate {path}: 'parents' must be 'all' or a list of model references")
    opts = spec.get("options") or {}
    if not isinstance(opts, dict) or set(opts) - _OPTION_KEYS:
        raise DMergeError(f"eval gate {path}: 'options' may set {sorted(_OPTION_KEYS)}")
    return Gate(datasets, checks, parents, EvalOptions(**opts), path)


def needs_parents(gate: Gate) -> bool:
    return any(c.max_drop is not None for c in gate.checks)


def check_scores(gate: Gate, output: str, scores: list[Score], parents: list[str]) -> list[str]:
    """The gate's verdict: one line per failed check (empty: passed)."""
    by = {(s.model, s.data): s for s in scores}
    failures = []
    for c in gate.checks:
        s = by[(output, c.data)]
        worse = (lambda a, b: a < b) if s.higher_is_better else (lambda a, b: a > b)
        if c.min is not None and s.value < c.min:
            failures.append(f"{c.data}: {s.metric} {s.value:.4g} is below the minimum {c.min:g}")
        if c.max is not None and s.value > c.max:
            failures.append(f"{c.data}: {s.metric} {s.value:.4g} is above the maximum {c.max:g}")
        if c.max_drop is not None and parents:
            ref = [by[(p, c.data)] for p in parents]
            best = max(ref, key=lambda r: r.value) if s.higher_is_better else min(ref, key=lambda r: r.value)
            limit = best.value - c.max_drop if s.higher_is_better else best.value + c.max_drop
            if worse(s.value, limit):
                failures.append(f"{c.data}: {s.metric} {s.value:.4g} is more than {c.max_drop:g} worse than the "
                                f"parent {best.model} ({best.value:.4g})")
    return failures


def run_gate(gate: Gate, output: str, parents: dict[str, str], client=None) -> tuple[list[str], list[Score]]:
    """Evaluate the output (and the parents, where a check compares with them), judge
    and mark the folder. ``parents``: reference -> location. Returns the failures and scores."""
    from dmerge.evaluate import evaluate

    wanted = parents if gate.parents is None else {p: parents.get(p, p) for p in gate.parents}
    compare = list(wanted) if needs_parents(gate) else []
    locations = [output] + [wanted[p] for p in compare]
    scores = evaluate(locations, gate.datasets, gate.options, client=client)
    for s in scores:  # parents by the names the recipe gives them
        if s.model != output:
            s.model = next(p for p in compare if wanted[p] == s.model)
    failures = check_scores(gate, output, scores, compare)
    mark_output(output, gate, failures, scores)
    return failures, scores


def mark_output(folder: str, gate: Gate, failures: list[str], scores: list[Score]) -> None:
    """EVAL_GATE_FAILED (or eval_gate.json) and a section in the model card."""
    from dmerge.evaluate import scores_table

    record = {"gate": os.path.abspath(gate.path) if gate.path else None, "passed": not failures,
              "failures": failures, "scores": [s.to_json() for s in scores]}
    stale = os.path.join(folder, FAILED_MARKER if not failures else PASSED_FILE)
    if os.path.exists(stale):
        os.remove(stale)
    with open(os.path.join(folder, PASSED_FILE if not failures else FAILED_MARKER), "w") as f:
        json.dump(record, f, indent=2)
    card = os.path.join(folder, "README.md")
    if not os.path.exists(card):
        return
    with open(card, encoding="utf-8") as f:
        text = f.read()
    table = scores_table(scores, [folder] + list(dict.fromkeys(s.model for s in scores if s.model != folder)))
    if failures:
        section = ["## Evaluation gate: FAILED", "",
                   f"This model failed the evaluation gate `{os.path.basename(gate.path)}` and should not be used "
                   "as a finished merge:", ""] + [f"* {f}" for f in failures] + ["", "```", table, "```", ""]
    else:
        section = ["## Evaluation gate: passed", "", f"Scores on the gate `{os.path.basename(gate.path)}`:", "",
                   "```", table, "```", ""]
    # after the front matter and title, so a reader sees it first
    lines = text.split("\n")
    title = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1)
    lines[title + 1:title + 1] = [""] + section
    with open(card, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
