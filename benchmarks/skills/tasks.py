"""The skills benchmark's generated tasks and its character-level tokenizer.

Two tasks, strings of 3 to 6 symbols:

* ``reverse`` a string of the letters a-h: ``"R cdab="`` -> ``"badc"``
* ``sort`` a string of the digits 0-7:     ``"S 3102="`` -> ``"0123"``

and a third, ``copy`` of either kind (``"C cd3b="`` -> ``"cd3b"``), which only the
pretraining mixture holds: it teaches the format and attention to the input without
either skill. The two skills read different symbols, as two real skills (code and
arithmetic, say) mostly do.
Every example ends with a newline, the stop string of the exact-match evaluation.
"""

from __future__ import annotations

import json
import os
import random

LETTERS = "abcdefgh"
DIGITS = "01234567"
ALPHABET = {"reverse": LETTERS, "sort": DIGITS, "copy": LETTERS + DIGITS}
MIN_LEN, MAX_LEN = 3, 6
TASKS = {"reverse": "R", "sort": "S", "copy": "C"}
CHARS = list(LETTERS) + list(DIGITS) + [" ", "=", "\n"] + list(TASKS.values())


def answer(task: str, s: str) -> str:
    if task == "reverse":
        return s[::-1]
    if task == "sort":
        return "".join(sorted(s))
    if task == "copy":
        return s
    raise ValueError(task)


def prompt(task: str, s: str) -> str:
    return f"{TASKS[task]} {s}="


def random_string(rng: random.Random, task: str) -> str:
    alphabet = ALPHABET[task]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def held_out_strings(seed: int, n: int, task: str) -> list[str]:
    """``n`` distinct strings for ``task``, reserved for evaluation (never trained on)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = random_string(rng, task)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def write_eval_sets(folder: str, seed: int, per_split: int) -> tuple[dict, set[str]]:
    """Two disjoint evaluation splits per skill task, ``search`` and ``holdout``, as
    prompt/answer jsonl files; returns their paths and every string they use."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    reserved: set[str] = set()
    for task in ("reverse", "sort"):
        strings = held_out_strings(seed, 2 * per_split, task)
        reserved.update(strings)
        for k, split in enumerate(("search", "holdout")):
            chunk = strings[k * per_split:(k + 1) * per_split]
            path = os.path.join(folder, f"{task}_{split}.jsonl")
            with open(path, "w") as f:
                for s in chunk:
                    f.write(json.dumps({"prompt": prompt(task, s), "answer": answer(task, s)}) + "\n")
            paths[(task, split)] = path
    return paths, reserved


def training_batch(rng: random.Random, mixture: dict[str, float], n: int, reserved: set[str]) -> list[str]:
    """``n`` training texts drawn from ``mixture`` (task -> share), avoiding ``reserved`` strings."""
    tasks, shares = zip(*mixture.items())
    out = []
    while len(out) < n:
        task = rng.choices(tasks, shares)[0]
        s = random_string(rng, task)
        if s in reserved:
            continue
        out.append(prompt(task, s) + answer(task, s) + "\n")
    return out


def write_char_tokenizer(folder: str) -> None:
    """The benchmark's character-level tokenizer, written into a model folder."""
    from dmerge.toymodels import write_char_tokenizer as write

    write(folder, CHARS)
