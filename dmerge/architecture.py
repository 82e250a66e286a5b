"""Which tensors belong to which decoder layer, and which ones index the vocabulary.

A decoder-only checkpoint names its per-layer tensors ``<container>.<index>.<rest>``
(``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``,
``gpt_neox.layers.3.attention.dense.weight``); nested indices such as Mixtral's
``experts.3`` stay in ``<rest>``. Every other tensor is *pre* (token and position
embeddings: read from the first slice of a recipe) or *post* (final norm, output head:
read from the last slice).

Known families (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, GPT-2, GPT-NeoX, Mixtral,
Qwen MoE) are looked up by the ``architectures`` entry of ``config.json``; they say
where the layers are, which tensors are indexed by token id (the token embedding and the
output head, which tied models leave out of the checkpoint) and which config keys hold
the layer count and the vocabulary size. Anything else is inferred from the tensor
names: the one stack of numbered tensors is the layers; names that look like embeddings
are *pre*. When the names show no stack, or several (an encoder and a decoder, a vision
tower), :func:`layout_of` says so instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from dmerge.errors import InputModelError


@dataclass(frozen=True)
class Family:
    """What dmerge knows about one model family's checkpoint layout."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layer_prefixes: tuple[str, ...]  # containers of numbered layers, preferred spelling first
    embeddings: tuple[str, ...]  # token embedding (vocabulary rows), with aliases
    heads: tuple[str, ...] = ("lm_head.weight",)  # output head (vocabulary rows); () if always tied
    pre_extra: tuple[str, ...] = ()  # other tensors read from the first slice (position embeddings)
    layers_key: str = "num_hidden_layers"
    vocab_key: str = "vocab_size"
    tie_key: str = "tie_word_embeddings"
    inferred: bool = False

    @property
    def head_name(self) -> str | None:
        return self.heads[0] if self.heads else None


_LLAMA_LIKE = dict(layer_prefixes=("model.layers",), embeddings=("model.embed_tokens.weight",))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM", "LLaMaForCausalLM"), ("llama",), **_LLAMA_LIKE),
    Family("mistral", ("MistralForCausalLM",), ("mistral",), **_LLAMA_LIKE),
    Family("mixtral", ("MixtralForCausalLM",), ("mixtral",), **_LLAMA_LIKE),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), **_LLAMA_LIKE),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), ("qwen2_moe",), **_LLAMA_LIKE),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), **_LLAMA_LIKE),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), **_LLAMA_LIKE),
    Family("gemma", ("GemmaForCausalLM",), ("gemma",), **_LLAMA_LIKE),
    Family("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), **_LLAMA_LIKE),
    Family("gemma3_text", ("Gemma3ForCausalLM",), ("gemma3_text",), **_LLAMA_LIKE),
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",), **_LLAMA_LIKE),
    Family(
        "gpt2", ("GPT2LMHeadModel",), ("gpt2",),
        layer_prefixes=("transformer.h", "h"),
        embeddings=("transformer.wte.weight", "wte.weight"),
        pre_extra=("transformer.wpe.weight", "wpe.weight"),
        layers_key="n_layer",
    ),
    Family(
        "gpt_neox", ("GPTNeoXForCausalLM",), ("gpt_neox",),
        layer_prefixes=("gpt_neox.layers",),
        embeddings=("gpt_neox.embed_in.weight",),
        heads=("embed_out.weight",),
    ),
)

_BY_ARCH = {a: f for f in FAMILIES for a in f.architectures}
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}

# Inference for unknown families.
_EMBED_HINT = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|word_embeddings|tok_embeddings|embeddings?)(\.|$)")
_POSITION_HINT = re.compile(r"(^|\.)(wpe|position_embeddings|embed_positions)(\.|$)")
_HEAD_HINT = re.compile(r"(^|\.)(lm_head|embed_out|output)(\.|$)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def family_for_config(config: Mapping) -> Family | None:
    """The known family of a ``config.json``, by ``architectures`` then ``model_type``."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in _BY_ARCH:
            return _BY_ARCH[a]
    if not archs:
        return _BY_TYPE.get(config.get("model_type", ""))
    return None


def architecture_key(config: Mapping, layout: "ModelLayout | None" = None) -> str:
    """What must agree between parents unless crimes are allowed."""
    fam = layout.family if layout is not None else family_for_config(config)
    if fam is not None and not fam.inferred:
        return fam.name
    archs = config.get("architectures") or []
    return archs[0] if archs else str(config.get("model_type", "unknown"))


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    suffix: str

    def renumbered(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.suffix}"

    @property
    def name(self) -> str:
        return self.renumbered(self.index)


def _split_layer(name: str, prefixes: Iterable[str]) -> LayerName | None:
    for p in prefixes:
        if name.startswith(p + "."):
            head, _, rest = name[len(p) + 1:].partition(".")
            if head.isdigit() and rest:
                return LayerName(p, int(head), rest)
    return None


def _first_numbered(name: str) -> LayerName | None:
    """``a.b.7.c.d`` -> (``a.b``, 7, ``c.d``): the first all-digit component."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            return LayerName(".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:]))
    return None


@dataclass
class ModelLayout:
    """A model's tensors grouped as pre / per-layer / post, in checkpoint order."""

    family: Family
    pre: list[str]
    layers: dict[int, list[LayerName]]
    post: list[str]
    embedding: str | None = None  # the token embedding tensor present in the checkpoint
    head: str | None = None  # the output head tensor, None when tied (absent)
    vocab: set[str] = field(default_factory=set)  # tensors whose rows are token ids
    layer_prefix: str = ""

    @property
    def num_layers(self) -> int:
        return (max(self.layers) + 1) if self.layers else 0

    @property
    def head_name(self) -> str | None:
        """Name of the output head, whether or not this checkpoint has one."""
        return self.head or self.family.head_name


def infer_family(config: Mapping, names: Iterable[str]) -> Family:
    """A family for an unknown architecture: its one stack of numbered tensors."""
    counts: dict[str, int] = {}
    for n in names:
        ln = _first_numbered(n)
        if ln is not None:
            counts[ln.prefix] = counts.get(ln.prefix, 0) + 1
    archs = config.get("architectures") or []
    what = archs[0] if archs else (config.get("model_type") or "unknown architecture")
    if not counts:
        raise InputModelError(
            f"cannot find the decoder layers of {what}: no tensor is named like '<prefix>.<layer index>.<name>' "
            "(e.g. model.layers.0.mlp.up_proj.weight)"
        )
    if len(counts) > 1:
        stacks = ", ".join(f"{p}.N ({c} tensors)" for p, c in sorted(counts.items()))
        raise InputModelError(
            f"cannot tell the decoder layers of {what} from its tensor names: several stacks of numbered "
            f"tensors ({stacks}); multi-module models (encoder-decoder, vision towers) are not supported"
        )
    prefix = next(iter(counts))
    layers_key = next((k for k in _LAYER_COUNT_KEYS if isinstance((config.get("text_config") or config).get(k), int)),
                      "num_hidden_layers")
    return Family(
        name=f"inferred:{what}", architectures=tuple(archs), model_types=(str(config.get("model_type", "")),),
        layer_prefixes=(prefix,), embeddings=(), heads=(), layers_key=layers_key, inferred=True,
    )


def layout_of(
    tensors: Mapping[str, tuple[int, ...]] | Iterable[str],
    reference: str,
    config: Mapping | None = None,
    declared_layers: int | None = None,
) -> ModelLayout:
    """Group a model's tensor names (with shapes, when known) by role.

    ``config`` picks the family; without one, or for an unknown family, the layer stack
    is inferred from the names. ``declared_layers`` (the config's layer count) is checked
    against the names.
    """
    config = config or {}
    shapes: dict[str, tuple[int, ...]] | None = dict(tensors) if isinstance(tensors, Mapping) else None
    names = list(shapes) if shapes is not None else list(tensors)
    fam = family_for_config(config)
    if fam is not None and not any(_split_layer(n, fam.layer_prefixes) for n in names):
        fam = None  # names do not follow the family's layout: infer instead
    if fam is None:
        try:
            fam = infer_family(config, names)
        except InputModelError as e:
            raise InputModelError(f"model {reference}: {e}") from None

    pre: list[str] = []
    post: list[str] = []
    layers: dict[int, list[LayerName]] = {}
    layer_prefix = ""
    for name in names:
        ln = _split_layer(name, fam.layer_prefixes)
        if ln is not None:
            layers.setdefault(ln.index, []).append(ln)
            layer_prefix = layer_prefix or ln.prefix
        elif name in fam.embeddings or name in fam.pre_extra:
            pre.append(name)
        elif fam.inferred and (_EMBED_HINT.search(name) or _POSITION_HINT.search(name)) and "embed_out" not in name:
            pre.append(name)
        else:
            post.append(name)

    embedding = next((n for n in fam.embeddings if n in names), None)
    head = next((n for n in fam.heads if n in names), None)
    vocab_size = _vocab_size(config, fam)
    if fam.inferred:
        embedding, head = _infer_vocab_tensors(pre, post, shapes, vocab_size)
    vocab = {n for n in (embedding, head) if n}
    if fam.inferred and head and shapes is not None:
        # a bias of the output head (phi-2's lm_head.bias) is indexed by token id too
        stem = head.rsplit(".", 1)[0]
        for n in post:
            if n != head and n.startswith(stem + ".") and shapes[n][:1] == shapes[head][:1]:
                vocab.add(n)

    layout = ModelLayout(fam, pre, dict(sorted(layers.items())), post, embedding, head, vocab, layer_prefix)
    if declared_layers is not None and layers and layout.num_layers != declared_layers:
        raise InputModelError(
            f"model {reference}: config declares {declared_layers} layers but tensor names show {layout.num_layers}"
        )
    missing = [i for i in range(layout.num_layers) if i not in layout.layers]
    if missing:
        raise InputModelError(f"model {reference}: no tensors found for layer {missing[0]}")
    return layout


def _vocab_size(config: Mapping, fam: Family) -> int | None:
    cfg = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    v = cfg.get(fam.vocab_key, config.get(fam.vocab_key))
    return v if isinstance(v, int) else None


def _infer_vocab_tensors(pre, post, shapes, vocab_size) -> tuple[str | None, str | None]:
    """Token embedding and output head of an unknown family, by name and row count."""

    def rows_ok(n: str) -> bool:
        if shapes is None:
            return True
        s = shapes[n]
        return len(s) == 2 and (vocab_size is None or s[0] == vocab_size)

    embedding = next((n for n in pre if _EMBED_HINT.search(n) and not _POSITION_HINT.search(n)
                      and n.endswith("weight") and rows_ok(n)), None)
    head = next((n for n in post if _HEAD_HINT.search(n) and n.endswith("weight") and rows_ok(n)), None)
    return embedding, head


def config_value(config: Mapping, key: str):
    """A value of ``config`` or of its ``text_config``."""
    if isinstance(config.get("text_config"), Mapping) and key in config["text_config"]:
        return config["text_config"][key]
    return config.get(key)
