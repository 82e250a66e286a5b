"""The output tokenizer: ``tokenizer_source``, the ``tokenizer:`` block, ``chat_template``.

Built on the client at plan time from the parents' tokenizer files (small metadata, like
config.json), with the ``transformers`` tokenizers (fast, ``tokenizers``-backed). What it
yields is a vocabulary (token -> output id) and, for every parent, a permutation (output
id -> that parent's row, or -1): :mod:`dmerge.vocab` turns those into row maps of the
embedding and output head.

The rules follow mergekit's so a recipe means the same thing:

* ``base``: the base model's tokenizer (or the first model's), with tokens whose id is
  beyond the model's ``vocab_size`` dropped;
* ``union``: that tokenizer plus every token of the other parents (ids below their
  ``vocab_size``) as added tokens, the parents' own added tokens with their settings
  (the first parent that adds a token wins);
* ``<model>``: that model's tokenizer as it is;
* ``tokenizer.tokens``: tokens added when missing, and where their rows come from;
* ``tokenizer.pad_to_multiple_of``: the vocabulary rounded up (``vocab_size`` too).

One difference: new tokens are appended in id order of their parent, so the output ids
are deterministic (mergekit's follow hash order).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from dmerge.architecture import config_value
from dmerge.errors import DMergeWarning, InputModelError, RecipeError
from dmerge.io import storage
from dmerge.io.model_source import TOKENIZER_FILES

TOKENIZER_ONLY_FILES = tuple(f for f in TOKENIZER_FILES if f != "generation_config.json")


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover
        raise RecipeError("merging tokenizers needs the transformers package (pip install transformers)") from None
    return transformers


@dataclass
class TokenizerSpec:
    """What the recipe asks for (``tokenizer_source`` or the ``tokenizer:`` block)."""

    source: str  # "base" | "union" | model reference
    tokens: dict[str, Any] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def tokenizer_spec(recipe) -> TokenizerSpec | None:
    if recipe.tokenizer is not None:
        return TokenizerSpec(recipe.tokenizer.source or "union", dict(recipe.tokenizer.tokens or {}),
                             recipe.tokenizer.pad_to_multiple_of)
    if recipe.tokenizer_source:
        return TokenizerSpec(recipe.tokenizer_source)
    return None


@dataclass
class MergedTokenizer:
    """The output vocabulary and how each parent's rows map into it."""

    spec: TokenizerSpec
    base: str
    tokenizer: Any = field(repr=False)  # transformers tokenizer, saved with the output
    vocab: dict[str, int] = field(repr=False)
    rows: int  # vocabulary size written to config.json (padded)
    permutations: dict[str, list[int]] = field(repr=False)  # model -> output id -> its row or -1
    original_vocabs: dict[str, dict[str, int]] = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.vocab)

    def describe(self) -> str:
        pad = f", padded to {self.rows}" if self.rows != self.n_tokens else ""
        return f"{self.spec.source} (base {self.base}): {self.n_tokens} tokens{pad}"


def _has_tokenizer(location: str) -> bool:
    try:
        return any(storage.exists(storage.join(location, f))
                   for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    except Exception:
        return False


def load_tokenizer(location: str, what: str, trust_remote_code: bool = False):
    """A fast tokenizer from a model folder (local, or any URL: files fetched first).

    ``trust_remote_code``: let a tokenizer that ships its own Python code run it (only
    possible for local folders: from a URL, only the standard tokenizer files are fetched).
    """
    tf = _transformers()
    try:
        if not storage.is_url(location):
            return tf.AutoTokenizer.from_pretrained(location, use_fast=True, trust_remote_code=trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="dmerge-tok-") as tmp:
            for name in TOKENIZER_FILES:
                src = storage.join(location, name)
                if storage.exists(src):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(storage.read_bytes(src))
            return tf.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise InputModelError(f"cannot load the tokenizer of {what}: {type(e).__name__}: {e}") from None


def _copy_tokenizer(tok, trust_remote_code: bool = False):
    """An independent copy (save and reload), so the parent's object is not changed."""
    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="dmerge-tok-") as tmp:
        tok.save_pretrained(tmp)
        return tf.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=trust_remote_code)


def strip_tokenizer(tok, vocab_size: int, what: str, trust_remote_code: bool = False):
    """Drop tokens with ids >= ``vocab_size`` (rows the model does not have)."""
    if not any(i >= vocab_size for i in tok.get_vocab().values()):
        return tok
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise InputModelError(f"{what}: its tokenizer has tokens beyond vocab_size {vocab_size} and is not a fast tokenizer")
    doc = json.loads(backend.to_str())
    model = doc.get("model", {})
    if not isinstance(model.get("vocab"), dict):
        raise InputModelError(
            f"{what}: its tokenizer ({model.get('type')}) has tokens beyond vocab_size {vocab_size}; "
            "only BPE and WordLevel tokenizers can be trimmed"
        )
    dropped = {t for t, i in model["vocab"].items() if i >= vocab_size}
    dropped |= {e["content"] for e in doc.get("added_tokens", []) if e["id"] >= vocab_size}
    doc["added_tokens"] = [e for e in doc.get("added_tokens", []) if e["id"] < vocab_size]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab_size}
    if "merges" in model:
        def keep(m):
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in dropped for p in parts)

        model["merges"] = [m for m in model["merges"] if keep(m)]
    from tokenizers import Tokenizer

    out = _copy_tokenizer(tok, trust_remote_code)
    out._tokenizer = Tokenizer.from_str(json.dumps(doc))
    return out


def _model_vocab_size(model, layout, tok) -> int:
    v = config_value(model.config, layout.family.vocab_key) if layout is not None else None
    if isinstance(v, int):
        return v
    return len(tok.get_vocab()) if tok is not None else 0


def build_union(base_tok, parents: list[tuple[str, Any, int]], trust_remote_code: bool = False):
    """Base tokenizer plus every parent's tokens (below its vocab size) as added tokens."""
    new_tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tok, vocab_size in parents:
        decoder = tok.added_tokens_decoder
        added_here = {info.content for info in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= vocab_size:
                warnings.warn(f"tokenizer of {ref}: token {t!r} has id {i} >= vocab_size {vocab_size}; ignored",
                              DMergeWarning, stacklevel=3)
                continue
            if t not in added_here:
                new_tokens.setdefault(t)
        for i, info in sorted(decoder.items()):
            if i < vocab_size and info.content not in added:
                added[info.content] = info
    out = _copy_tokenizer(base_tok, trust_remote_code)
    base_vocab = base_tok.get_vocab()
    for t in new_tokens:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_tokenizer(recipe, models: dict, layouts: dict, trust_remote_code: bool = False) -> MergedTokenizer | None:
    """The merged tokenizer a recipe asks for, or None when it asks for none."""
    spec = tokenizer_spec(recipe)
    if spec is None:
        return None
    refs = [r for r in recipe.referenced_models() if r in models]
    base = recipe.base_model or refs[0]

    toks: dict[str, Any] = {}
    for ref in refs:
        m = models[ref]
        if _has_tokenizer(m.location):
            toks[ref] = load_tokenizer(m.location, f"model {ref}", trust_remote_code)
        elif ref == base:
            raise InputModelError(f"model {ref}: no tokenizer files in {m.location}, needed for tokenizer_source")
        else:
            warnings.warn(f"model {ref} has no tokenizer files; assuming it uses {base}'s", DMergeWarning, stacklevel=2)
    sizes = {ref: _model_vocab_size(models[ref], layouts.get(ref), toks.get(ref) or toks[base]) for ref in refs}
    base_tok = strip_tokenizer(toks[base], sizes[base], f"model {base}", trust_remote_code)
    toks[base] = base_tok

    if spec.source == "base":
        out = _copy_tokenizer(base_tok, trust_remote_code)
    elif spec.source == "union":
        order = [base] + [r for r in refs if r != base and r in toks]
        out = build_union(base_tok, [(r, toks[r], sizes[r]) for r in order], trust_remote_code)
    else:
        if spec.source in models:
            location = models[spec.source].location
        else:
            location = storage.resolve_location(spec.source, recipe.source_dir)
        out = load_tokenizer(location, f"tokenizer_source {spec.source}", trust_remote_code)

    existing = set(out.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)

    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise InputModelError(f"the merged tokenizer's ids are not 0..{n - 1}; cannot lay out its embedding rows")
    rows = n
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        rows = n + spec.pad_to_multiple_of - n % spec.pad_to_multiple_of

    permutations: dict[str, list[int]] = {}
    originals: dict[str, dict[str, int]] = {}
    for ref in refs:
        mv = (toks.get(ref) or base_tok).get_vocab()
        originals[ref] = mv
        p = [-1] * n
        for t, new in vocab.items():
            old = mv.get(t, -1)
            p[new] = old if 0 <= old < sizes[ref] else -1
        permutations[ref] = p
    return MergedTokenizer(spec, base, out, vocab, rows, permutations, originals)


# ---------------------------------------------------------------------------------------
# chat templates and saving


def resolve_chat_template(value: str | None, models: dict, trust_remote_code: bool = False) -> str | None:
    """``chat_template``: ``auto`` (the parents' most common), a built-in name, or Jinja text."""
    if not value:
        return None
    from dmerge.chat_templates import TEMPLATES

    if value == "auto":
        counts: dict[str, int] = {}
        for m in models.values():
            if not _has_tokenizer(m.location):
                continue
            try:
                t = load_tokenizer(m.location, m.reference, trust_remote_code).chat_template
            except InputModelError:
                continue
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                counts[t.strip()] = counts.get(t.strip(), 0) + 1
        return max(counts, key=counts.get) if counts else None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if "{" not in value or len(value) < 20:
        raise RecipeError(
            f"chat_template: {value!r} is neither a built-in template ({', '.join(sorted(TEMPLATES))}, auto) nor Jinja text"
        )
    return value


def tokenizer_files(tok, chat_template: str | None) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for ``tok`` (with the chat template set)."""
    if chat_template:
        tok.chat_template = chat_template
    with tempfile.TemporaryDirectory(prefix="dmerge-tok-") as tmp:
        tok.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out


__all__ = ["MergedTokenizer", "TokenizerSpec", "build_tokenizer", "tokenizer_spec", "resolve_chat_template",
           "tokenizer_files", "load_tokenizer"]
