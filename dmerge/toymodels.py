"""Llama-shaped model families written on the fly, for the demo, tests and benchmarks.

Only torch and safetensors are needed: tensors are named and shaped as Hugging Face's
``LlamaForCausalLM`` expects, with a matching ``config.json``, so
``AutoModelForCausalLM.from_pretrained`` loads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    layers: int = 4
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def random_weights(shape: LlamaShape, seed: int, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """A base model: N(0, 0.02) matrices, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shape.tensor_shapes().items():
        if len(s) == 1:
            t = 1.0 + 0.1 * torch.randn(s, generator=g)
        else:
            t = 0.02 * torch.randn(s, generator=g)
        out[name] = t.to(DTYPES[dtype])
    return out


def fine_tune_of(base: dict[str, torch.Tensor], seed: int, scale: float = 0.005) -> dict[str, torch.Tensor]:
    """A "fine-tune": the base plus a small random task vector."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v.float() + scale * torch.randn(v.shape, generator=g) * (v.float().abs().mean() / 0.02 if v.dim() == 1 else 1)).to(v.dtype)
        for k, v in base.items()
    }


def write_model(folder: str, weights: dict[str, torch.Tensor], config: dict, shard_bytes: int | None = None) -> str:
    """Write a HF-style folder: config.json + model.safetensors (or shards + index)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = list(weights)
    if shard_bytes is None:
        save_file({k: weights[k].contiguous() for k in names}, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    groups: list[list[str]] = [[]]
    size = 0
    for k in names:
        nb = weights[k].numel() * weights[k].element_size()
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nb
    weight_map = {}
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: weights[k].contiguous() for k in g}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in g})
    total = sum(w.numel() * w.element_size() for w in weights.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder


def write_family(root: str, shape: LlamaShape, n_fine_tunes: int = 2, dtype: str = "bfloat16",
                 shard_bytes: int | None = None, seed: int = 0) -> list[str]:
    """Write ``base`` and ``ft1..ftN`` under ``root``; returns their folders (base first)."""
    base = random_weights(shape, seed, dtype)
    cfg = shape.config(dtype)
    folders = [write_model(os.path.join(root, "base"), base, cfg, shard_bytes)]
    for i in range(1, n_fine_tunes + 1):
        ft = fine_tune_of(base, seed + 1000 * i)
        folders.append(write_model(os.path.join(root, f"ft{i}"), ft, cfg, shard_bytes))
        del ft
    return folders


LLAMA_405B = LlamaShape(hidden=16384, layers=126, intermediate=53248, heads=128, kv_heads=8, vocab=128256)


def write_sparse_model(folder: str, shape: LlamaShape, dtype: str = "bfloat16", shard_bytes: int = 5_000_000_000) -> str:
    """A model folder whose shards hold real headers and a sparse hole for the data.

    The files have their full apparent size (a 405B parent is 810 GB) but take almost no
    disk: enough for planning, which reads headers only.
    """
    from dmerge.io.safetensors_format import DTYPE_NAMES, build_header

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape.config(dtype), f, indent=2)
    code = DTYPE_NAMES[dtype]
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensor_shapes().items():
        nb = item
        for d in s:
            nb *= d
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, s))
        size += nb
    weight_map = {}
    total = 0
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offsets = build_header([(n, code, s) for n, s in g])
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(header)
            f.truncate(len(header) + offsets[-1][1])
        weight_map.update({n: fname for n, _ in g})
        total += offsets[-1][1]
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return folder


def write_wordlevel_tokenizer(folder: str, words: list[str], special: list[str] = (), added: list[str] = (),
                              chat_template: str | None = None) -> None:
    """A tiny real tokenizer (``tokenizers`` WordLevel, whitespace split) for tests and demos.

    Ids: ``<unk> <s> </s>``, then ``words``, then the ``special`` added tokens, then the
    plain ``added`` tokens. Written as tokenizer.json + tokenizer_config.json, which
    ``transformers.AutoTokenizer`` loads offline.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    base = ["<unk>", "<s>", "</s>"] + list(words)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(base)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", *special]])
    if added:
        tok.add_tokens([AddedToken(t, normalized=True) for t in added])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 256}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def write_char_tokenizer(folder: str, chars: list[str], model_max_length: int = 64) -> None:
    """A character-level tokenizer (``tokenizers`` WordLevel over single characters,
    decoded without spaces between them) for tests and the skills benchmark.

    Ids: ``<unk> <s> </s>``, then ``chars`` in order; ``<unk>`` doubles as padding. Written
    as tokenizer.json + tokenizer_config.json, which ``transformers.AutoTokenizer`` loads offline.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": model_max_length}, f, indent=2)
