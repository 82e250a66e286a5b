"""Which tensors belong to which decoder layer, inferred from tensor names.

Decoder-only checkpoints name per-layer tensors ``<prefix>.<index>.<suffix>``
(``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``,
``gpt_neox.layers.3...``). Everything else is either *pre* (embeddings, read by the first
slice) or *post* (final norm, lm_head, read by the last slice), as mergekit plans them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmerge.errors import InputModelError

# The layer container is the last path component before the index; the prefix is lazy so
# that nested indices (Mixtral's ``experts.3``) stay in the suffix.
_LAYER = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    suffix: str

    def renumbered(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.suffix}"


def parse_layer_name(name: str) -> LayerName | None:
    m = _LAYER.match(name)
    if not m:
        return None
    return LayerName(m.group("prefix"), int(m.group("index")), m.group("suffix"))


@dataclass
class ModelLayout:
    """A model's tensors grouped as pre / per-layer / post, in checkpoint order."""

    pre: list[str]
    layers: dict[int, list[LayerName]]
    post: list[str]

    @property
    def num_layers(self) -> int:
        return (max(self.layers) + 1) if self.layers else 0


def layout_of(tensor_names: list[str], reference: str, declared_layers: int | None = None) -> ModelLayout:
    """Group tensor names; checks the layer indices against ``num_hidden_layers`` if known."""
    pre: list[str] = []
    post: list[str] = []
    layers: dict[int, list[LayerName]] = {}
    for name in tensor_names:
        ln = parse_layer_name(name)
        if ln is not None:
            layers.setdefault(ln.index, []).append(ln)
        elif any(h in name for h in _PRE_HINTS):
            pre.append(name)
        else:
            post.append(name)
    layout = ModelLayout(pre, dict(sorted(layers.items())), post)
    if declared_layers is not None and layers and layout.num_layers != declared_layers:
        raise InputModelError(
            f"model {reference}: config declares {declared_layers} layers but tensor names show {layout.num_layers}"
        )
    missing = [i for i in range(layout.num_layers) if i not in layout.layers]
    if missing:
        raise InputModelError(f"model {reference}: no tensors found for layer {missing[0]}")
    return layout
