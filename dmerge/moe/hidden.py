"""The prompt pass that computes a FrankenMoE's routers, one decoder layer per task.

mergekit-moe loads the whole base model to run the prompts; here no task holds more
than one decoder layer. The graph is a chain:

    embed ──► layer 0 ──► layer 1 ──► ... ──► layer L-1
                │           │                    │
              rows 0      rows 1     ...      rows L-1      (router tensors, written)
              stats 0     stats 1             stats L-1 ──► report

``embed`` reads the embedding rows of the prompts' tokens (by byte range, only the rows
used); ``layer i`` reads layer ``i``'s tensors by byte range, builds the installed
transformers' own decoder layer of the base's family (``LlamaDecoderLayer``, ...: its
attention, RoPE, GQA and norms), computes layer ``i``'s router rows from the activations
entering it (and from its MoE block's input, captured on the way), runs the prompts
through it and hands the activations on. Only the activations ``[prompts, tokens,
hidden]`` travel between tasks. The arithmetic is float32 (on the worker's GPU where
``--cuda`` and one is present).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from dmerge.moe import gates
from dmerge.tasks import Reduction, _inference, compute_device, read_rows
from dmerge.io.safetensors_format import DTYPES
from dmerge.numerics import widen


@dataclass(frozen=True)
class Location:
    """A parent tensor's file and header entry (what a task needs to read it)."""

    file: str
    entry: Any  # TensorEntry


@dataclass(frozen=True)
class Prompts:
    """Every prompt of the recipe, tokenized once (left padding), and which are whose.

    ``groups[k]`` = (positive indices, negative indices) of router row ``k`` (routed
    experts first, then shared ones); ``evals[e]`` = the held-out prompts of routed
    expert ``e`` for the routing report.
    """

    input_ids: tuple[tuple[int, ...], ...]
    attention_mask: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    evals: tuple[tuple[int, ...], ...]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask), ``[prompts, tokens]`` each."""
        return torch.tensor(self.input_ids, dtype=torch.long), torch.tensor(self.attention_mask, dtype=torch.long)

    def group_lists(self) -> list[tuple[list[int], list[int]]]:
        """``groups`` as lists (what the gate functions index with)."""
        return [(list(p), list(n)) for p, n in self.groups]


@dataclass
class RouterPass:
    """The computation of a MoE plan's router tensors (see the module docstring); plain
    data that the graph turns into tasks (:meth:`tasks`)."""

    model_type: str  # transformers model_type of the base (its decoder layer class)
    config: dict  # the base's config.json
    mode: str  # gate mode
    embedding: Location
    layers: list[dict[str, Location]]  # per layer: name inside the layer -> location
    prompts: Prompts
    n_routed: int
    n_shared: int
    hidden: int
    seed: int = 0
    chunk_bytes: int = 128 << 20  # what one block of a layer's weights may hold (see StreamedLinear)
    names: list[str] = field(default_factory=list)  # routed expert names, for the report
    report_file: str = "routing_report.json"  # where the routing report goes in the output folder

    @property
    def n_layers(self) -> int:
        """Decoder layers of the base."""
        return len(self.layers)

    @property
    def n_tasks(self) -> int:
        # embed, per layer: the layer, its rows, its shared rows, its stats; the report
        return 1 + self.n_layers * (3 + (1 if self.n_shared else 0)) + 1

    @property
    def layer_bytes(self) -> list[int]:
        return [sum(loc.entry.nbytes for loc in layer.values()) for layer in self.layers]

    @property
    def bytes_read(self) -> int:
        ids, _ = self.prompts.tensors()
        embed_rows = len(set(ids.view(-1).tolist())) * self.embedding.entry.row_bytes
        return embed_rows + sum(self.layer_bytes)

    @property
    def activation_bytes(self) -> int:
        n, t = len(self.prompts.input_ids), len(self.prompts.input_ids[0]) if self.prompts.input_ids else 0
        return n * t * self.hidden * 4

    @property
    def peak_task_bytes(self) -> int:
        """One block of a layer's weights (stored and float32, within ``chunk_bytes``),
        the small tensors (norms, biases), and a few copies of the activations (input,
        attention, MLP intermediates)."""
        block = 0
        small = 0
        for layer in self.layers:
            for name, loc in layer.items():
                if name.endswith(".weight") and len(loc.entry.shape) == 2:
                    per_row = loc.entry.row_bytes * 3  # bf16/fp16 stored + float32 (fp32: an overestimate)
                    block = max(block, min(loc.entry.rows, rows_per_block(loc, self.chunk_bytes)) * per_row)
                else:
                    small = max(small, loc.entry.nbytes * 3)
        inter = int(self.config.get("intermediate_size") or 4 * self.hidden)
        acts = 6 * self.activation_bytes + 3 * self.activation_bytes * inter // max(1, self.hidden)
        return block + small * 4 + acts

    def describe(self) -> str:
        """One line for `dmerge plan`."""
        return (f"routers ({self.mode}) from {len(self.prompts.input_ids)} prompts, layer by layer over "
                f"{self.n_layers} layers: {self.n_tasks} tasks")

    def fingerprint(self) -> str:
        """A hash of everything that decides the routers (part of the plan's fingerprint)."""
        h = hashlib.sha256()
        h.update(repr((self.model_type, sorted(self.config.items(), key=lambda kv: kv[0]), self.mode, self.seed,
                       self.n_routed, self.n_shared, self.prompts, self.embedding,
                       [sorted(layer.items()) for layer in self.layers])).encode())
        return h.hexdigest()[:16]

    def tasks(self, key_name: str, device: str) -> tuple[dict, dict, tuple]:
        """The graph of the pass: (tasks, {part: key} of the computed tensors, report key).
        Parts: ``router:i`` (routed experts' rows of layer i), ``shared:i`` (shared experts')."""
        dsk: dict = {}
        parts: dict[str, tuple] = {}
        prev = (key_name, -1, "embed")
        dsk[prev] = (embed_prompts, self, device)
        stats = []
        for i in range(self.n_layers):
            key = (key_name, -1, "layer", i)
            dsk[key] = (run_layer, self, i, prev, device)
            parts[f"router:{i}"] = (key_name, -1, "rows", i)
            dsk[parts[f"router:{i}"]] = (layer_part, key, "router")
            if self.n_shared:
                parts[f"shared:{i}"] = (key_name, -1, "shared", i)
                dsk[parts[f"shared:{i}"]] = (layer_part, key, "shared")
            stats.append((key_name, -1, "stats", i))
            dsk[stats[-1]] = (layer_part, key, "stats")
            prev = key
        report = (key_name, -1, "report")
        dsk[report] = (routing_report, self.names, self.mode, stats)
        return dsk, parts, report


@dataclass
class LayerState:
    """What one task of the chain hands on: the activations entering the next layer,
    and what it found for its own layer (router rows, routing counts)."""

    hidden: torch.Tensor | None  # [prompts, tokens, hidden], float32
    rows: torch.Tensor | None = None  # [routed + shared, hidden]
    cheap: torch.Tensor | None = None  # cheap_embed rows (the same for every layer)
    stats: dict | None = None
    bytes_read: int = 0


def _read_tensor(loc: Location, device: str) -> tuple[torch.Tensor, int]:
    buf, n = read_rows(loc.file, loc.entry, 0, loc.entry.rows)
    t = buf.view(DTYPES[loc.entry.dtype]).reshape(loc.entry.shape) if buf.numel() else torch.empty(loc.entry.shape)
    return widen(t.to(device), torch.float32), n


def _read_embedding_rows(loc: Location, ids: torch.Tensor, device: str) -> tuple[torch.Tensor, int]:
    """The embedding rows of the distinct token ids, each read by byte range."""
    wanted = sorted(set(ids.view(-1).tolist()))
    rows, nread = [], 0
    for tok in wanted:
        buf, n = read_rows(loc.file, loc.entry, tok, tok + 1)
        nread += n
        rows.append(buf.view(DTYPES[loc.entry.dtype]).reshape(1, *loc.entry.shape[1:]))
    table = widen(torch.cat(rows).to(device), torch.float32)
    index = torch.tensor([wanted.index(t) for t in ids.view(-1).tolist()], device=device)
    return table[index].reshape(*ids.shape, -1), nread


@_inference
def embed_prompts(rp: RouterPass, device: str = "cpu") -> LayerState:
    """The activations entering layer 0 (the token embeddings; no family here scales them)."""
    device = compute_device(device)
    ids, mask = rp.prompts.tensors()
    h, nread = _read_embedding_rows(rp.embedding, ids, device)
    cheap = None
    if rp.mode == "cheap_embed":
        cheap = gates.cheap_embed_rows(h, mask.to(device), rp.prompts.group_lists()).cpu()
    return LayerState(hidden=h, cheap=cheap, bytes_read=nread)


@functools.lru_cache(maxsize=None)
def layer_classes(model_type: str):
    """The installed transformers' decoder layer and rotary embedding classes of a family."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    found = {}
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            for suffix in ("DecoderLayer", "RotaryEmbedding"):
                if name.endswith(suffix) and suffix not in found:
                    found[suffix] = obj
    if len(found) < 2:
        raise RuntimeError(f"transformers has no decoder layer and rotary embedding for {model_type}")
    return found["DecoderLayer"], found["RotaryEmbedding"]


def hf_config(model_type: str, config: dict):
    """The transformers config object of a config.json, with eager attention (our own mask)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    cfg._attn_implementation = "eager"
    return cfg


def attention_mask_4d(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal and padding mask as an additive ``[prompts, 1, tokens, tokens]`` tensor, as
    transformers builds it for a full forward with ``attention_mask``."""
    n, t = mask.shape
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=mask.device))
    allowed = causal[None] & mask.bool()[:, None, :]
    return torch.zeros(n, 1, t, t, dtype=dtype, device=mask.device).masked_fill(~allowed[:, None],
                                                                               torch.finfo(dtype).min)


# Rows of one matrix product in StreamedLinear.
MATMUL_ROWS = 256


def block_product(loc: Location, r0: int, r1: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x @ W[r0:r1].T`` with rows ``[r0, r1)`` of the weight read by byte range and
    widened to ``x``'s dtype, in fixed MATMUL_ROWS-row products (so the result does not
    depend on how many rows one read brings); returns it and the bytes read."""
    entry = loc.entry
    buf, n = read_rows(loc.file, entry, r0, r1)
    w = widen(buf.view(DTYPES[entry.dtype]).reshape(r1 - r0, *entry.shape[1:]).to(x.device), x.dtype)
    out = torch.empty(*x.shape[:-1], r1 - r0, dtype=x.dtype, device=x.device)
    for s0 in range(0, r1 - r0, MATMUL_ROWS):
        s1 = min(r1 - r0, s0 + MATMUL_ROWS)
        out[..., s0:s1] = x @ w[s0:s1].T
    return out, n


@_inference
def block_task(loc: Location, r0: int, r1: int, x: torch.Tensor, device: str = "cpu") -> tuple[torch.Tensor, int]:
    """:func:`block_product` as a task of its own (on any worker; the result comes back on the CPU)."""
    out, n = block_product(loc, r0, r1, x.to(compute_device(device)))
    return out.cpu(), n


def _worker_client():
    """A client to submit tasks from inside a task (None outside a Dask worker)."""
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        return None
    return worker_client()


class StreamedLinear(torch.nn.Module):
    """A linear layer whose weight stays where it is stored: each call reads it by
    byte range in blocks of ``rows_per_block`` output rows (contiguous in the file),
    widens a block to float32, multiplies, and drops it. A task then holds one block,
    not the layer: a 405B decoder layer (6.4 GB in bf16) runs within a worker's chunk
    budget. A weight of several blocks, in a task on a Dask worker, has its blocks
    computed as tasks of their own (``block_task``, each within the budget, on any
    worker, in parallel); the layer task waits for them outside the worker's thread
    pool. Either way each output column is the same float32 dot products.
    """

    def __init__(self, weight: Location, bias: torch.Tensor | None, rows_per_block: int, device: str = "cpu"):
        super().__init__()
        self.loc = weight
        self.bias = bias
        self.rows_per_block = max(1, rows_per_block)
        self.device = device
        self.bytes_read = 0
        self.block_tasks = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``, reading ``W`` block by block."""
        out_rows = self.loc.entry.shape[0]
        blocks = [(r0, min(out_rows, r0 + self.rows_per_block)) for r0 in range(0, out_rows, self.rows_per_block)]
        client = _worker_client() if len(blocks) > 1 else None
        if client is not None:
            with client as c:
                xc = x.cpu()  # the activations travel with each block task (small next to a block)
                futures = [c.submit(block_task, self.loc, r0, r1, xc, self.device, pure=False) for r0, r1 in blocks]
                parts = c.gather(futures)
            self.block_tasks += len(blocks)
            out = torch.cat([p.to(x.device) for p, _ in parts], dim=-1)
            self.bytes_read += sum(n for _, n in parts)
        else:
            out = torch.empty(*x.shape[:-1], out_rows, dtype=x.dtype, device=x.device)
            for r0, r1 in blocks:
                out[..., r0:r1], n = block_product(self.loc, r0, r1, x)
                self.bytes_read += n
        if self.bias is not None:
            out += self.bias
        return out


def rows_per_block(loc: Location, budget: int) -> int:
    """Output rows of a weight one read may bring (stored bytes plus the float32 copy
    within ``budget``), a multiple of MATMUL_ROWS."""
    per_row = loc.entry.row_bytes + 4 * (loc.entry.row_bytes // max(1, DTYPES[loc.entry.dtype].itemsize))
    return max(MATMUL_ROWS, budget // max(1, per_row) // MATMUL_ROWS * MATMUL_ROWS)


def build_layer(rp: RouterPass, index: int, device: str):
    """Decoder layer ``index`` of the base as the installed transformers' module: its
    norms (small) read by byte range, its linear layers replaced by
    :class:`StreamedLinear` (weights read block by block within ``rp.chunk_bytes`` as
    the forward needs them). Returns (layer, rotary embedding, linears, bytes read so far)."""
    layer_cls, rotary_cls = layer_classes(rp.model_type)
    cfg = hf_config(rp.model_type, rp.config)
    with torch.device("meta"):
        layer = layer_cls(cfg, index)
    locs = rp.layers[index]
    linears = {}
    nread = 0
    for name, module in list(layer.named_modules()):
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in locs:
            bias = None
            if module.bias is not None:
                bias, n = _read_tensor(locs[f"{name}.bias"], device)
                nread += n
            linears[name] = StreamedLinear(locs[f"{name}.weight"], bias,
                                           rows_per_block(locs[f"{name}.weight"], rp.chunk_bytes), device)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, linears[name])
    state = {}
    for name, loc in locs.items():
        owner = name.rpartition(".")[0]
        if owner in linears:
            continue
        state[name], n = _read_tensor(loc, device)
        nread += n
    missing, unexpected = layer.load_state_dict(state, assign=True, strict=False)
    missing = [m for m in missing if m.rpartition(".")[0] not in linears]
    if missing or unexpected:
        raise RuntimeError(f"layer {index}: tensors the module lacks {unexpected}, or has no weights for {missing}")
    return layer.eval(), rotary_cls(cfg).to(device), list(linears.values()), nread


def decoder_forward(layer, rotary, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompts through one decoder layer; returns (its output, the input of its
    MLP block: the post-attention norm's output, captured by a hook)."""
    captured = {}
    hook = layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        out = layer(h, attention_mask=attention_mask_4d(mask, h.dtype), position_ids=pos,
                    position_embeddings=rotary(h, pos))
    finally:
        hook.remove()
    return (out[0] if isinstance(out, tuple) else out), captured["x"]


def layer_rows(rp: RouterPass, index: int, h: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
               cheap: torch.Tensor | None) -> torch.Tensor:
    """Router rows of layer ``index`` (routed experts, then shared) for the recipe's gate mode."""
    groups = rp.prompts.group_lists()
    if rp.mode == "hidden":
        return gates.contrast_rows(gates.last_token(h), groups)
    if rp.mode == "router_input":
        return gates.centered_rows(gates.masked_mean(x, mask), groups, rp.n_routed)
    if rp.mode == "cheap_embed":
        return cheap.to(h.device)
    return gates.random_rows(rp.mode, rp.n_routed + rp.n_shared, rp.hidden, rp.seed, index).to(h.device)


@_inference
def run_layer(rp: RouterPass, index: int, prev: LayerState, device: str = "cpu") -> LayerState:
    """Layer ``index`` of the chain: its router rows, its routing counts, and the
    activations entering the next layer."""
    device = compute_device(device)
    ids, mask = rp.prompts.tensors()
    mask = mask.to(device)
    layer, rotary, linears, nread = build_layer(rp, index, device)
    h = prev.hidden.to(device)
    out, x = decoder_forward(layer, rotary, h, mask)
    nread += sum(lin.bytes_read for lin in linears)
    rows = layer_rows(rp, index, h, x, mask, prev.cheap)
    routed = rows[: rp.n_routed]
    stats = {"own": [], "total": [], "max_cosine": None, "n_shared": rp.n_shared}
    for e, evals in enumerate(rp.prompts.evals):
        idx = list(evals)
        top = gates.routed_top1(routed, x[idx], mask[idx]) if idx else torch.empty(0, dtype=torch.long)
        stats["own"].append(int((top == e).sum()))
        stats["total"].append(len(idx))
    cos, pair = gates.max_row_cosine(routed.cpu())
    stats["max_cosine"] = (cos, pair)
    del layer
    last = index == rp.n_layers - 1
    return LayerState(hidden=None if last else out, rows=rows.cpu(), cheap=prev.cheap, stats=stats,
                      bytes_read=nread + (prev.bytes_read if index == 0 else 0))


def layer_part(state: LayerState, part: str):
    """One small result of a layer task (so the activations are released early): its
    routed rows or shared rows (with the bytes the layer read, reported once), or its stats."""
    if part == "stats":
        return state.stats
    if part == "router":
        return Reduction(state.rows[: state.rows.shape[0] - _n_shared(state)], state.bytes_read)
    return Reduction(state.rows[state.rows.shape[0] - _n_shared(state):], 0)


def _n_shared(state: LayerState) -> int:
    return state.stats.get("n_shared", 0)


def routing_report(names: list[str], mode: str, stats: list[dict]) -> dict:
    """Per layer and overall: the share of each expert's held-out prompts routed top-1 to it."""
    per_layer = []
    own_total = [0] * len(names)
    all_total = [0] * len(names)
    for i, s in enumerate(stats):
        shares = {}
        for e, name in enumerate(names):
            own_total[e] += s["own"][e]
            all_total[e] += s["total"][e]
            shares[name] = s["own"][e] / s["total"][e] if s["total"][e] else None
        cos, pair = s["max_cosine"]
        per_layer.append({"layer": i, "share_top1_own": shares,
                          "max_row_cosine": round(cos, 6), "closest_experts": [names[pair[0]], names[pair[1]]]})
    overall = {name: (own_total[e] / all_total[e] if all_total[e] else None) for e, name in enumerate(names)}
    n = sum(all_total)
    return {"gate_mode": mode, "experts": names,
            "overall_share_top1_own": overall,
            "overall": sum(own_total) / n if n else None,
            "layers_majority_own": {name: sum(1 for pl in per_layer if (pl["share_top1_own"][name] or 0) > 0.5)
                                    for name in names},
            "per_layer": per_layer}
