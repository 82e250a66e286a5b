"""Scoring models on held-out data: perplexity, exact-match accuracy, lm-evaluation-harness.

Three layers, kept apart:

* **metrics** (pure): per-token negative log-likelihoods from logits, perplexity, the
  Wilson and bootstrap intervals, the exact-match rule. Tensors and numbers in, numbers out.
* **scoring a model** (:func:`score_model`): a loaded causal LM and its tokenizer, batched
  forward passes and a greedy decoding loop with a stop rule.
* **orchestration** (:func:`evaluate`): load each model (any storage URL), score it on each
  data set, in this process or as one task per model on a Dask cluster.

Data files (:func:`load_data`):

* ``*.jsonl`` whose records hold ``prompt`` and ``answer``: exact match. The model
  continues the prompt greedily until a stop string (default: a newline) or its
  end-of-sequence token or ``max_new_tokens``; the continuation cut at the stop string and
  stripped of surrounding whitespace must equal the stripped answer.
* ``*.jsonl`` whose records hold ``text``, or a ``*.txt`` file (one document per non-empty
  line): perplexity, exp(total negative log-likelihood / total predicted tokens), over the
  tokens of every document (documents longer than the window, the model's context but at
  most 2048 tokens unless ``max_length`` says otherwise, are cut into windows).

Confidence intervals are 95 %: Wilson score intervals for accuracies (a proportion of
independent problems), a percentile bootstrap over documents for perplexity (1000
resamples, seeded, so the interval is reproducible).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from dmerge.errors import DMergeError

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
BOOTSTRAP_RESAMPLES = 1000
DEFAULT_STOP = "\n"


# ---------------------------------------------------------------------------------------
# Data


@dataclass
class Dataset:
    """A held-out data set: its name, the metric it is scored with, and its records."""

    name: str
    metric: str  # "exact_match" or "perplexity"
    records: list  # [{"prompt", "answer"}] or [str]
    path: str = ""


def load_data(path: str, name: str | None = None) -> Dataset:
    """Read a data file (see the module's docstring for the formats)."""
    from dmerge.io import storage

    label = name or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except (OSError, FileNotFoundError) as e:
        raise DMergeError(f"cannot read data file {path}: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError:
        raise DMergeError(f"data file {path} is not UTF-8 text") from None
    if path.endswith(".txt"):
        docs = [line for line in text.splitlines() if line.strip()]
        if not docs:
            raise DMergeError(f"data file {path} has no text")
        return Dataset(label, "perplexity", docs, path)
    if not path.endswith(".jsonl"):
        raise DMergeError(f"data file {path}: expected .jsonl (prompt/answer or text records) or .txt")
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DMergeError(f"{path} line {i} is not JSON: {e.msg}") from None
        if not isinstance(r, dict):
            raise DMergeError(f"{path} line {i}: expected a JSON object")
        records.append((i, r))
    if not records:
        raise DMergeError(f"data file {path} has no records")
    first = records[0][1]
    if "prompt" in first and "answer" in first:
        metric, keys = "exact_match", ("prompt", "answer")
    elif "text" in first:
        metric, keys = "perplexity", ("text",)
    else:
        raise DMergeError(f"{path} line {records[0][0]}: a record needs 'prompt' and 'answer' (exact match) "
                          f"or 'text' (perplexity); found {sorted(first)}")
    out = []
    for i, r in records:
        missing = [k for k in keys if not isinstance(r.get(k), str)]
        if missing:
            raise DMergeError(f"{path} line {i}: '{missing[0]}' is missing or not a string")
        out.append({"prompt": r["prompt"], "answer": r["answer"]} if metric == "exact_match" else r["text"])
    return Dataset(label, metric, out, path)


# ---------------------------------------------------------------------------------------
# Metrics (pure)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed negative log-likelihood of each token given those before
    it, and how many tokens were predicted. ``logits`` [B, T, V] from ids [B, T];
    positions where ``attention_mask`` is 0 (padding) are neither predicted nor context."""
    target = input_ids[:, 1:]
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()
    # one row at a time: a float32 copy of the whole [B, T, V] batch would double the
    # logits' memory (16 x 2048 x 128k floats are 16 GiB)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits[i, :-1].float(), target[i], reduction="none")
                       for i in range(logits.shape[0])]) * mask
    return nll.sum(-1).double(), mask.sum(-1).long()


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    if n_tokens <= 0:
        return float("nan")
    return math.exp(nll_sum / n_tokens)


def bootstrap_perplexity_interval(doc_nll: list[float], doc_tokens: list[int], seed: int = 0,
                                  resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the corpus perplexity, resampling documents."""
    nll = torch.tensor(doc_nll, dtype=torch.float64)
    tok = torch.tensor(doc_tokens, dtype=torch.float64)
    n = len(doc_nll)
    if n < 2:
        p = perplexity(float(nll.sum()), int(tok.sum()))
        return p, p
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    ppl = torch.exp(nll[idx].sum(1) / tok[idx].sum(1).clamp(min=1))
    lo, hi = torch.quantile(ppl, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cut_at_stop(text: str, stop: str | None) -> str:
    """The continuation up to (not including) the first stop string."""
    if stop:
        i = text.find(stop)
        if i >= 0:
            return text[:i]
    return text


def exact_match(prediction: str, answer: str, stop: str | None = DEFAULT_STOP) -> bool:
    """The exact-match rule: the continuation cut at ``stop``, stripped, equals the stripped answer."""
    return cut_at_stop(prediction, stop).strip() == answer.strip()


# ---------------------------------------------------------------------------------------
# Scores


@dataclass
class Score:
    """One model's score on one data set, with its 95 % interval."""

    model: str
    data: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int  # problems or documents
    ci_method: str
    higher_is_better: bool = True
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class EvalOptions:
    batch_size: int = 16
    max_new_tokens: int = 32
    stop: str | None = DEFAULT_STOP
    max_length: int | None = None  # tokens per window for perplexity (default: the model's context)
    device: str | None = None  # default: cuda when present, else cpu
    seed: int = 0  # of the bootstrap
    quiet: bool = False
    keep_predictions: bool = False


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)


DEFAULT_WINDOW = 2048  # tokens per perplexity window unless --max-length says otherwise


def _context_length(model, default: int = DEFAULT_WINDOW) -> int:
    """The perplexity window: the model's context, at most DEFAULT_WINDOW tokens (a
    128k-token context in one forward pass would not fit in memory)."""
    cfg = getattr(model, "config", None)
    return min(default, int(getattr(cfg, "max_position_embeddings", None) or default))


@torch.no_grad()
def score_perplexity(model, tokenizer, docs: list[str], options: EvalOptions, label: str = "") -> dict:
    """Perplexity of ``docs`` and its bootstrap interval; per-document sums are kept for it."""
    window = options.max_length or _context_length(model)
    device = next(model.parameters()).device
    pieces: list[tuple[int, list[int]]] = []  # (document, token ids of one window)
    for d, text in enumerate(docs):
        ids = tokenizer(text)["input_ids"]
        for start in range(0, max(1, len(ids)), window):
            piece = ids[start:start + window]
            if len(piece) >= 2:
                pieces.append((d, piece))
    doc_nll = [0.0] * len(docs)
    doc_tok = [0] * len(docs)
    bar = _progress(len(pieces), f"perplexity {label}", options.quiet)
    for b in range(0, len(pieces), options.batch_size):
        batch = pieces[b:b + options.batch_size]
        longest = max(len(p) for _, p in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, (_, p) in enumerate(batch):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll, count = token_nll(logits, ids, mask)
        for (d, _), s, c in zip(batch, nll.tolist(), count.tolist()):
            doc_nll[d] += s
            doc_tok[d] += c
        bar.update(len(batch))
    bar.close()
    used = [i for i, c in enumerate(doc_tok) if c > 0]
    if not used:
        raise DMergeError(f"{label}: no document has two tokens or more; perplexity is undefined")
    nll = [doc_nll[i] for i in used]
    tok = [doc_tok[i] for i in used]
    lo, hi = bootstrap_perplexity_interval(nll, tok, seed=options.seed)
    return {"value": perplexity(sum(nll), sum(tok)), "ci_low": lo, "ci_high": hi, "n": len(used),
            "extra": {"tokens": sum(tok)}}


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], options: EvalOptions, label: str = "") -> list[str]:
    """Each prompt continued greedily (batched, left-padded, with a key/value cache) until
    the stop string, the end-of-sequence token or ``max_new_tokens``."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    out: list[str] = []
    # transformers 5 renamed the key/value cache argument (the old name warns, then goes)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    bar = _progress(len(prompts), f"generating {label}", options.quiet)
    for b in range(0, len(prompts), options.batch_size):
        batch = [tokenizer(p)["input_ids"] for p in prompts[b:b + options.batch_size]]
        longest = max(len(p) for p in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding: every prompt ends at the last column
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generated = [[] for _ in batch]
        finished = [False] * len(batch)
        past = None
        step_ids = ids
        for _ in range(options.max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_arg: past})
            past = getattr(res, cache_arg)
            nxt = res.logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if finished[i]:
                    continue
                if eos is not None and t == eos:
                    finished[i] = True
                    continue
                generated[i].append(t)
                if options.stop and options.stop in tokenizer.decode(generated[i], skip_special_tokens=True):
                    finished[i] = True
            if all(finished):
                break
            step_ids = nxt.unsqueeze(-1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
            positions = positions[:, -1:] + 1
        out += [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
        bar.update(len(batch))
    bar.close()
    return out


def score_exact_match(model, tokenizer, records: list[dict], options: EvalOptions, label: str = "") -> dict:
    """Exact-match accuracy over prompt/answer records, with its Wilson interval."""
    predictions = greedy_continuations(model, tokenizer, [r["prompt"] for r in records], options, label)
    hits = [exact_match(p, r["answer"], options.stop) for p, r in zip(predictions, records)]
    k, n = sum(hits), len(hits)
    lo, hi = wilson_interval(k, n)
    extra = {"correct": k}
    if options.keep_predictions:
        extra["predictions"] = [cut_at_stop(p, options.stop) for p in predictions]
    return {"value": k / n, "ci_low": lo, "ci_high": hi, "n": n, "extra": extra}


def score_model(model, tokenizer, model_name: str, datasets: list[Dataset], options: EvalOptions) -> list[Score]:
    """Score a loaded model on each data set."""
    scores = []
    for d in datasets:
        label = f"{os.path.basename(model_name.rstrip('/'))}/{d.name}"
        if d.metric == "exact_match":
            r = score_exact_match(model, tokenizer, d.records, options, label)
            scores.append(Score(model_name, d.name, "exact_match", ci_method="wilson95", **r))
        elif d.metric == "perplexity":
            r = score_perplexity(model, tokenizer, d.records, options, label)
            scores.append(Score(model_name, d.name, "perplexity", ci_method="bootstrap95", higher_is_better=False,
                                **r))
        else:
            raise DMergeError(f"unknown metric {d.metric!r} for {d.name}")
    return scores


# ---------------------------------------------------------------------------------------
# Loading models from any storage


def _device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            return "cpu"
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def local_model_folder(location: str):
    """A local folder holding the model at ``location``: itself if local, else a
    temporary copy of its files (removed on leaving)."""
    from dmerge.io import storage

    loc = storage.resolve_location(location)
    if not storage.is_url(loc):
        if not os.path.isdir(loc):
            raise DMergeError(f"model folder {location} does not exist")
        yield loc
        return
    fs, path = storage.filesystem_for(loc)
    try:
        names = [p for p in fs.ls(path, detail=False)]
    except (OSError, FileNotFoundError) as e:
        raise DMergeError(f"cannot list model {location}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="dmerge-eval-") as tmp:
        for p in names:
            base = p.rstrip("/").rsplit("/", 1)[-1]
            if fs.isdir(p):
                continue
            fs.get_file(p, os.path.join(tmp, base))
        yield tmp


def load_model(folder: str, device: str | None = None):
    """A causal LM and its tokenizer from a local folder, in float32 on CPU (bfloat16 on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev = _device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise DMergeError(f"cannot load the tokenizer of {folder}: {e}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except Exception as e:
            raise DMergeError(f"cannot load the model in {folder}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(dev).eval()
    return model, tokenizer


def evaluate_one(location: str, datasets: list[Dataset], options: EvalOptions, lm_eval_tasks: list[str] = ()) -> list[Score]:
    """Load one model (any storage URL) and score it: what a worker runs as one task."""
    scores: list[Score] = []
    with local_model_folder(location) as folder:
        if datasets:
            with _hf_progress_off():
                model, tokenizer = load_model(folder, options.device)
            scores += score_model(model, tokenizer, location, datasets, options)
            del model
        if lm_eval_tasks:
            scores += run_lm_eval(folder, location, list(lm_eval_tasks), options)
    return scores


@contextlib.contextmanager
def _hf_progress_off():
    """transformers' "Loading weights" bar off while a model loads."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------
# lm-evaluation-harness


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(folder: str, model_name: str, tasks: list[str], options: EvalOptions) -> list[Score]:
    """Delegate named benchmark tasks to lm-evaluation-harness (when installed); each
    task's metrics become scores with a normal 95 % interval from the harness's stderr."""
    if not lm_eval_available():
        raise DMergeError("--lm-eval needs lm-evaluation-harness, which is not installed "
                          "(pip install lm-eval); dmerge does not reimplement its benchmarks")
    import lm_eval

    dev = _device(options.device)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=auto", tasks=tasks,
                                      batch_size=options.batch_size, device=dev)
    return lm_eval_scores(results, model_name)


def lm_eval_scores(results: dict, model_name: str) -> list[Score]:
    """Scores from lm-evaluation-harness's result dict (``results[task]["acc,none"]`` and
    ``"acc_stderr,none"``)."""
    scores = []
    for task, metrics in (results.get("results") or {}).items():
        n = (results.get("n-samples") or {}).get(task, {}).get("effective", 0)
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            se = metrics.get(f"{name}_stderr,{filt}") if filt else metrics.get(f"{name}_stderr")
            se = se if isinstance(se, (int, float)) else float("nan")
            higher = not any(w in name for w in ("perplexity", "ppl", "bits_per_byte"))
            label = name if filt in ("", "none") else f"{name},{filt}"
            scores.append(Score(model_name, task, f"lm_eval:{label}", float(value), float(value) - Z95 * se,
                                float(value) + Z95 * se, int(n or 0), "normal95(stderr)", higher))
    return scores


# ---------------------------------------------------------------------------------------
# Orchestration


def evaluate(models: list[str], datasets: list[Dataset], options: EvalOptions | None = None,
             lm_eval_tasks: list[str] = (), client=None) -> list[Score]:
    """Score every model on every data set. With a Dask ``client``, each model is one
    task on the cluster (a worker that declares a GPU gets it); without, in this process."""
    options = options or EvalOptions()
    if lm_eval_tasks and not lm_eval_available():
        run_lm_eval("", "", list(lm_eval_tasks), options)  # raises the one clear error, before any work
    if client is None:
        out = []
        for m in models:
            out += evaluate_one(m, datasets, options, lm_eval_tasks)
        return out
    futures = submit_evaluations(client, models, datasets, options, lm_eval_tasks)
    return [s for f in futures for s in f.result()]


def submit_evaluations(client, models: list[str], datasets: list[Dataset], options: EvalOptions,
                       lm_eval_tasks: list[str] = ()) -> list:
    """One evaluation task per model on ``client``'s cluster; returns the futures."""
    import uuid

    quiet = EvalOptions(**{**asdict(options), "quiet": True})  # workers' bars would interleave
    gpu = {a for a, w in client.scheduler_info()["workers"].items() if w.get("resources", {}).get("GPU")}
    return [client.submit(evaluate_one, m, datasets, quiet, tuple(lm_eval_tasks), pure=False,
                          key=f"dmerge-eval-{uuid.uuid4().hex[:12]}", resources={"GPU": 1} if gpu else None)
            for m in models]


def scores_table(scores: list[Score], models: list[str] | None = None) -> str:
    """A plain-text table: one row per (data, metric), one column per model, each cell the
    score and its 95 % interval."""
    models = models or list(dict.fromkeys(s.model for s in scores))
    rows = list(dict.fromkeys((s.data, s.metric) for s in scores))
    by = {(s.model, s.data, s.metric): s for s in scores}
    names = _short_names(models)

    def cell(s: Score | None) -> str:
        if s is None:
            return "-"
        return f"{_fmt(s.value)} [{_fmt(s.ci_low)}, {_fmt(s.ci_high)}]"

    header = ["data", "metric", "n"] + names
    lines = [header]
    for data, metric in rows:
        n = next((by[(m, data, metric)].n for m in models if (m, data, metric) in by), 0)
        lines.append([data, metric, str(n)] + [cell(by.get((m, data, metric))) for m in models])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append("(95% intervals: Wilson for exact_match, bootstrap over documents for perplexity)")
    return "\n".join(text)


def _fmt(x: float) -> str:
    if x != x:  # nan
        return "nan"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _short_names(models: list[str]) -> list[str]:
    """Column titles: the folder names, or the full references where those clash."""
    short = [os.path.basename(m.rstrip("/")) or m for m in models]
    return short if len(set(short)) == len(short) else list(models)


def scores_json(scores: list[Score], models: list[str], datasets: list[Dataset], options: EvalOptions) -> dict:
    return {
        "models": models,
        "data": [{"name": d.name, "path": d.path, "metric": d.metric, "n": len(d.records)} for d in datasets],
        "options": {k: v for k, v in asdict(options).items() if k not in ("quiet",)},
        "scores": [s.to_json() for s in scores],
    }


def plot_scores(scores: list[Score], path: str, models: list[str] | None = None) -> None:
    """A PNG bar chart: one panel per (data, metric), one bar per model with its interval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DMergeError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    models = models or list(dict.fromkeys(s.model for s in scores))
    rows = list(dict.fromkeys((s.data, s.metric) for s in scores))
    by = {(s.model, s.data, s.metric): s for s in scores}
    names = _short_names(models)
    fig, axes = plt.subplots(1, len(rows), figsize=(max(4, 1 + 0.6 * len(models)) * len(rows), 4), squeeze=False)
    for ax, (data, metric) in zip(axes[0], rows):
        vals, lows, highs, labels = [], [], [], []
        for m, n in zip(models, names):
            s = by.get((m, data, metric))
            if s is None:
                continue
            vals.append(s.value)
            lows.append(max(0.0, s.value - s.ci_low))
            highs.append(max(0.0, s.ci_high - s.value))
            labels.append(n)
        ax.bar(range(len(vals)), vals, yerr=[lows, highs], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(vals)), labels, rotation=45, ha="right")
        ax.set_title(f"{data} ({metric})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
