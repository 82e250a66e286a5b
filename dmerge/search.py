"""``dmerge search``: tune a recipe's numeric parameters by merging and evaluating candidates.

What is searched. Without a ``search:`` block, every float parameter value in the recipe:
each number under a ``parameters`` mapping (per model, top level, or a slice source),
including each point of a gradient list and each ``value`` of a filtered entry, for the
parameters the method reads as numbers (weight, density, t, lambda, epsilon, ...; not
booleans such as ``normalize``). Each one is a dimension with bounds taken from the
parameter's own range where it has one (density (0, 1], t [0, 1]) and otherwise
[0, max(1.5, 2 x its value)] for weights and [0, max(1, 2 x its value)] for the rest.
A ``search:`` block, which is removed before the recipe is merged, names the dimensions
and bounds instead, by dotted path::

    search:
      models.0.parameters.weight: [0.2, 1.2]
      models.1.parameters.weight.1: [0, 1]     # the second point of a gradient
      parameters.density: [0.1, 0.9]

How. CMA-ES (the ``cmaes`` library), in the box of the bounds scaled to [0, 1]^d,
starting from the recipe's own values with step 0.25; or ``--strategy random`` (uniform
in the box). Trial 0 is always the recipe as written. Every trial is a merge (written to a
temporary folder, removed once scored) and an evaluation on the ``--eval`` data; the
objective is the mean over those data sets of the accuracy (exact match) or of
-ln(perplexity). The evaluations run as tasks on one Dask cluster (``--scheduler``, or an
in-process local cluster), so a candidate's evaluation overlaps the next candidate's merge.
The merges themselves run one after another through :func:`dmerge.execute.run_plan` on
that same cluster: each merge already fills the cluster with its own tasks, and two merges
driven at once from one process hung once in a trial, so they are not run concurrently.

Resuming. Each trial is appended to a JSON-lines log as it finishes. Run again with the
same log, the search checks that recipe and settings are unchanged, replays the logged
trials (CMA-ES asks for the same points again, from its seed) and goes on with the rest.

Validation. The best recipe (and the recipe as written) are scored on the ``--holdout``
data, never seen by the search; both splits are reported and written, as comments, at the
top of the best recipe's YAML.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import yaml

from dmerge.errors import DMergeError
from dmerge.evaluate import Dataset, EvalOptions, Score

LOG_FORMAT = 1


@dataclass(frozen=True)
class Dimension:
    """One searched number: where it sits in the recipe, its bounds and its start value."""

    path: tuple
    low: float
    high: float
    start: float

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)

    def value(self, unit: float) -> float:
        """The parameter value at ``unit`` in [0, 1]."""
        return self.low + min(1.0, max(0.0, unit)) * (self.high - self.low)

    def unit(self, value: float) -> float:
        return 0.5 if self.high == self.low else (value - self.low) / (self.high - self.low)


def _parse_path(text: str) -> tuple:
    return tuple(int(p) if p.lstrip("-").isdigit() else p for p in str(text).split("."))


def _get(data, path: tuple):
    for p in path:
        data = data[p]
    return data


def _set(data, path: tuple, value) -> None:
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def _numbers(setting, sub: tuple = ()):
    """The (sub-path, number) of every number in a parameter setting."""
    if isinstance(setting, dict):
        if "value" in setting:
            yield from _numbers(setting["value"], sub + ("value",))
    elif isinstance(setting, list):
        for i, v in enumerate(setting):
            yield from _numbers(v, sub + (i,))
    elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
        yield sub, float(setting)


def _default_bounds(param, name: str, value: float) -> tuple[float, float]:
    low = param.minimum if param is not None and param.minimum is not None else 0.0
    if param is not None and param.min_exclusive:
        low += 0.01
    if param is not None and param.maximum is not None:
        high = float(param.maximum)
    else:
        high = max(1.5 if name == "weight" else 1.0, 2 * abs(value))
    low = min(low, value)
    return float(low), float(max(high, value))


def search_space(data: dict) -> list[Dimension]:
    """The dimensions of a recipe (a dict as loaded from YAML; see the module docstring)."""
    from dmerge.methods import get_method

    spec = data.get("search")
    if spec is not None:
        if not isinstance(spec, dict) or not spec:
            raise DMergeError("search: must map parameter paths to [low, high] bounds")
        dims = []
        for key, bounds in spec.items():
            path = _parse_path(key)
            try:
                value = _get(data, path)
            except (KeyError, IndexError, TypeError):
                raise DMergeError(f"search: {key} names no value in the recipe") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DMergeError(f"search: {key} is {value!r}, not a number")
            if (not isinstance(bounds, list) or len(bounds) != 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                    or bounds[0] > bounds[1]):
                raise DMergeError(f"search: {key} needs bounds [low, high] with low <= high, got {bounds!r}")
            dims.append(Dimension(path, float(bounds[0]), float(bounds[1]), float(value)))
        return dims
    try:
        method = get_method(data.get("merge_method", ""))
    except Exception:
        raise DMergeError(f"unknown merge_method {data.get('merge_method')!r}") from None
    params = {p.name: p for p in list(method.params) + list(method.model_params)}
    places: list[tuple] = [("parameters",)]
    places += [("models", i, "parameters") for i in range(len(data.get("models") or []))]
    for si, s in enumerate(data.get("slices") or []):
        places += [("slices", si, "sources", j, "parameters") for j in range(len(s.get("sources") or []))]
        places.append(("slices", si, "parameters"))
    dims = []
    for place in places:
        try:
            scope = _get(data, place)
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(scope, dict):
            continue
        for name, setting in scope.items():
            param = params.get(name)
            if param is None or param.kind is not float:
                continue
            for sub, value in _numbers(setting):
                low, high = _default_bounds(param, name, value)
                dims.append(Dimension(place + (name,) + sub, low, high, value))
    if not dims:
        raise DMergeError("the recipe has no numeric parameter to search (add a search: block naming some)")
    return dims


def candidate(data: dict, dims: list[Dimension], values: list[float]) -> dict:
    """The recipe with ``values`` in place (rounded to 4 decimals, as a person would write them)."""
    out = copy.deepcopy({k: v for k, v in data.items() if k != "search"})
    for d, v in zip(dims, values):
        _set(out, d.path, round(float(v), 4))
    return out


def objective(scores: list[Score]) -> float:
    """The mean over data sets of accuracy, or of -ln(perplexity)."""
    if not scores:
        return float("nan")
    return sum(s.value if s.higher_is_better else -math.log(max(s.value, 1e-12)) for s in scores) / len(scores)


# ---------------------------------------------------------------------------------------
# The trial log


def read_log(path: str) -> tuple[dict | None, list[dict]]:
    """The log's header and its trials; a torn last line (a crash mid-write) is dropped."""
    if not os.path.exists(path):
        return None, []
    header, trials = None, []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line, cut short
                break
            raise DMergeError(f"search log {path} line {i + 1} is not JSON") from None
        if header is None:
            header = rec
        else:
            trials.append(rec)
    return header, trials


class TrialLog:
    def __init__(self, path: str, header: dict):
        self.path = path
        old, trials = read_log(path)
        if old is not None and {k: old.get(k) for k in header} != header:
            changed = sorted(k for k in header if old.get(k) != header[k])
            raise DMergeError(f"search log {path} belongs to another search ({', '.join(changed)} changed); "
                              "use another --log or remove it to start again")
        self.trials = {t["trial"]: t for t in trials}
        # rewrite whole (drops a torn last line), then append
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for t in trials:
                f.write(json.dumps(t) + "\n")

    def record(self, trial: dict) -> None:
        self.trials[trial["trial"]] = trial
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(trial) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------
# Points to try


class _Proposer:
    """Points in [0, 1]^d, generation by generation: CMA-ES or uniform random."""

    def __init__(self, strategy: str, start: list[float], seed: int, population: int | None):
        import numpy as np

        self.np = np
        self.strategy = strategy
        d = len(start)
        self.dimensions = d
        if strategy == "cmaes":
            try:
                from cmaes import CMA
            except ImportError:
                raise DMergeError("the cmaes strategy needs the cmaes package (pip install 'dmerge[search]'), "
                                  "or pass --strategy random") from None

            # CMA-ES's weights are undefined below 4 candidates a generation (cmaes divides by zero)
            population = max(4, population or 4 + int(3 * math.log(d)))
            self.cma = CMA(mean=np.clip(np.array(start, dtype=float), 0.0, 1.0), sigma=0.25,
                           bounds=np.array([[0.0, 1.0]] * d), seed=seed, population_size=population)
            self.population = self.cma.population_size
        elif strategy == "random":
            self.rng = np.random.default_rng(seed)
            self.population = population or max(2, 4 + int(3 * math.log(max(d, 1))))
        else:
            raise DMergeError(f"unknown search strategy {strategy!r} (cmaes or random)")

    def ask(self) -> list[list[float]]:
        if self.strategy == "cmaes":
            return [list(map(float, self.cma.ask())) for _ in range(self.population)]
        return [list(map(float, self.rng.random(self.dimensions))) for _ in range(self.population)]

    def tell(self, points: list[list[float]], values: list[float]) -> None:
        if self.strategy == "cmaes":  # cmaes minimises
            self.cma.tell([(self.np.array(p), -v) for p, v in zip(points, values)])


# ---------------------------------------------------------------------------------------
# The search


@dataclass
class SearchResult:
    best: dict  # the best trial's log record
    start: dict  # trial 0: the recipe as written
    best_holdout: list[Score]
    start_holdout: list[Score]
    best_recipe_text: str
    trials: list[dict]


def _recipe_from(data: dict, source_dir: str, allow_crimes: bool):
    from dmerge.recipe import load_recipe

    text = yaml.safe_dump(data, sort_keys=False)
    recipe = load_recipe(text, is_text=True, allow_crimes=allow_crimes)
    recipe.source_dir = source_dir  # relative model paths stay relative to the original recipe
    return recipe


def run_search(recipe_path: str, datasets: list[Dataset], holdout: list[Dataset], *, trials: int, log_path: str,
               out_path: str | None = None, strategy: str = "cmaes", seed: int = 0, population: int | None = None,
               options: EvalOptions | None = None, scheduler: str | None = None, workers: int | None = None,
               threads_per_worker: int | None = None, workdir: str | None = None, quiet: bool = False,
               allow_crimes: bool = False, echo=None) -> SearchResult:
    """Search the recipe's numeric parameters (see the module docstring)."""
    import warnings

    from distributed import Client, LocalCluster

    from dmerge.evaluate import submit_evaluations
    from dmerge.execute import ClusterOptions, run_plan
    from dmerge.plan import build_plan

    echo = echo or (lambda line: print(line, file=sys.stderr))
    options = options or EvalOptions()
    if trials < 1:
        raise DMergeError("--trials must be at least 1")
    if not datasets:
        raise DMergeError("search needs --eval data to score candidates")
    try:
        with open(recipe_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DMergeError(f"cannot read recipe {recipe_path}: {e.strerror}") from None
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise DMergeError(f"recipe {recipe_path} must be a YAML mapping")
    source_dir = os.path.dirname(os.path.abspath(recipe_path))
    dims = search_space(data)
    start_unit = [min(1.0, max(0.0, d.unit(d.start))) for d in dims]
    _recipe_from(candidate(data, dims, [d.start for d in dims]), source_dir, allow_crimes)  # fails early if bad

    header = {"dmerge_search": LOG_FORMAT, "recipe_sha256": hashlib.sha256(text.encode()).hexdigest(),
              "dimensions": [[d.name, d.low, d.high] for d in dims], "strategy": strategy, "seed": seed,
              "population": population, "eval": [[d.name, d.metric, len(d.records)] for d in datasets],
              "options": {"max_new_tokens": options.max_new_tokens, "stop": options.stop,
                          "max_length": options.max_length}}
    log = TrialLog(log_path, header)
    proposer = _Proposer(strategy, start_unit, seed, population)
    resumed = len(log.trials)
    if resumed:
        echo(f"search: resuming from {log_path}: {resumed} trial{'s' if resumed != 1 else ''} logged")

    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="dmerge-search-")
    os.makedirs(workdir, exist_ok=True)
    eval_quiet = EvalOptions(**{**options.__dict__, "quiet": True})
    cluster = client = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if scheduler:
                client = Client(scheduler, timeout="30s")
            else:
                n_workers = workers or 1
                threads = threads_per_worker or max(1, (os.cpu_count() or 1) // n_workers)
                cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=False,
                                       dashboard_address=":0", silence_logs=50)
                client = Client(cluster)
        address = client.scheduler.address
        merge_cluster = ClusterOptions(scheduler=address)

        def merge(values: list[float], folder: str) -> dict:
            cand = candidate(data, dims, values)
            recipe = _recipe_from(cand, source_dir, allow_crimes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = build_plan(recipe, seed=seed)
            shutil.rmtree(folder, ignore_errors=True)  # what a crashed run left of this trial
            run_plan(plan, folder, cluster=merge_cluster, quiet=True, write_model_card=False)
            return cand

        def run_generation(gen: int, first_trial: int, points: list[list[float]], with_holdout: bool = False,
                           exact: list[list[float]] | None = None):
            """Merge the points not yet logged and score them; returns every point's record.
            ``exact``: the parameter values themselves (trial 0: the recipe as written, even
            where a value lies outside its search bounds)."""
            pending = []  # (trial, unit point, values, folder, future)
            records: dict[int, dict] = {}
            for k, unit in enumerate(points):
                t = first_trial + k
                if t in log.trials:
                    rec = log.trials[t]
                    if len(rec["unit"]) != len(unit) or any(abs(a - b) > 1e-6 for a, b in zip(rec["unit"], unit)):
                        raise DMergeError(f"search log {log_path}: trial {t} was another point than the search "
                                          "proposes again (a changed cmaes version?); use another --log")
                    records[t] = rec
                    continue
                values = exact[k] if exact else [d.value(u) for d, u in zip(dims, unit)]
                folder = os.path.join(workdir, f"trial-{t:04d}")
                started = time.perf_counter()
                try:
                    merge(values, folder)
                except DMergeError as e:
                    if t == 0:
                        raise  # the recipe as written must merge
                    # a candidate the method refuses (NaN produced, say) is a failed trial, not a failed search
                    pending.append((t, unit, values, folder, e, started))
                    continue
                sets = datasets + (holdout if with_holdout else [])
                fut = submit_evaluations(client, [folder], sets, eval_quiet)[0]
                pending.append((t, unit, values, folder, fut, started))
            for t, unit, values, folder, fut, started in pending:
                if isinstance(fut, DMergeError):
                    rec = {"trial": t, "generation": gen, "unit": unit,
                           "params": {d.name: round(v, 4) for d, v in zip(dims, values)}, "scores": {},
                           "objective": None, "error": str(fut), "seconds": round(time.perf_counter() - started, 2)}
                    log.record(rec)
                    records[t] = rec
                    echo(f"trial {t}: failed: {fut}")
                    continue
                scores = fut.result()
                shutil.rmtree(folder, ignore_errors=True)
                # one model: its scores come in data-set order, the search's first
                search_scores, holdout_scores = scores[:len(datasets)], scores[len(datasets):]
                rec = {"trial": t, "generation": gen, "unit": unit,
                       "params": {d.name: round(v, 4) for d, v in zip(dims, values)},
                       "scores": {s.data: s.value for s in search_scores}, "objective": objective(search_scores),
                       "seconds": round(time.perf_counter() - started, 2)}
                if with_holdout:
                    rec["holdout"] = [s.to_json() for s in holdout_scores]
                log.record(rec)
                records[t] = rec
                if not quiet:
                    echo(f"trial {t}: objective {rec['objective']:.4f} " +
                         " ".join(f"{k}={v:.4g}" for k, v in rec["params"].items()))
            return [records[first_trial + k] for k in range(len(points))]

        # trial 0: the recipe as written, scored on both splits (the reference to beat)
        start_rec = run_generation(-1, 0, [start_unit], with_holdout=bool(holdout), exact=[[d.start for d in dims]])[0]
        t, gen = 1, 0
        while t < trials:
            points = proposer.ask()[:trials - t]
            recs = run_generation(gen, t, points)
            if len(points) == proposer.population:
                # a failed trial counts as worse than every scored one
                scored = [r["objective"] for r in recs if r["objective"] is not None]
                worst = (min(scored) if scored else 0.0) - 1.0
                proposer.tell(points, [worst if r["objective"] is None else r["objective"] for r in recs])
            t += len(points)
            gen += 1

        every = [log.trials[i] for i in sorted(log.trials) if i < trials]
        best = max((r for r in every if r["objective"] is not None), key=lambda r: (r["objective"], -r["trial"]))
        best_values = [best["params"][d.name] for d in dims]
        best_data = candidate(data, dims, best_values)
        best_holdout, start_holdout = [], []
        if holdout:
            start_holdout = [Score(**s) for s in start_rec.get("holdout", [])]
            if best["trial"] == 0:
                best_holdout = start_holdout
            else:
                folder = os.path.join(workdir, "best")
                merge(best_values, folder)
                best_holdout = submit_evaluations(client, [folder], holdout, eval_quiet)[0].result()
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    best_text = _best_recipe_text(best_data, best, start_rec, best_holdout, start_holdout, len(every))
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(best_text)
    return SearchResult(best, start_rec, best_holdout, start_holdout, best_text, every)


def _best_recipe_text(data: dict, best: dict, start: dict, best_holdout: list[Score], start_holdout: list[Score],
                      n_trials: int) -> str:
    def fmt(scores: dict) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())

    lines = [f"# found by dmerge search: trial {best['trial']} of {n_trials}",
             f"# search split: objective {best['objective']:.4f} ({fmt(best['scores'])})",
             f"# recipe as written (trial 0): objective {start['objective']:.4f} ({fmt(start['scores'])})"]
    if best_holdout:
        lines.append(f"# held-out split: objective {objective(best_holdout):.4f} "
                     f"({fmt({s.data: s.value for s in best_holdout})})")
        lines.append(f"# held-out, recipe as written: objective {objective(start_holdout):.4f} "
                     f"({fmt({s.data: s.value for s in start_holdout})})")
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)
