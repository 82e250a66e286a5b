"""Vocabulary tensors re-indexed for a merged tokenizer: row maps and row gathers.

When the output tokenizer differs from a parent's, the rows of that parent's embedding
and output head (tensors indexed by token id) must be permuted into the output's token
order before the merge method sees them, and rows for tokens the parent lacks must be
filled. A :class:`RowMap`, built at plan time from token ids alone, says for every
output row of every source where its value comes from:

* ``own[s][r] >= 0``: row ``own[s][r]`` of source ``s`` itself;
* else ``copy_from[r] = (j, row)``: row ``row`` of source ``j`` (the only parent that has
  the token, the base model, or a ``tokenizer.tokens`` override);
* else ``means[r] = ((j, row), ...)``: the mean of those rows (a token several parents,
  but not the base, have);
* else zeros (a token no parent has), or, for ``r >= n_tokens`` (rows added by
  ``pad_to_multiple_of``), the mean of the source's first ``n_tokens`` assembled rows.

These are mergekit's rules (``tokenizer/embed.py``), restated. At run time a chunk task
gathers the rows its window needs: per source tensor, the distinct rows are grouped in
contiguous runs, each run one ranged read. The padding mean is a reduction over the
whole tensor; it is summed over fixed blocks of rows (``block_rows``, chosen from the
tensor's shape only) in a fixed order, so the output bytes do not depend on chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmerge.lazy import torch

from dmerge.errors import RecipeError
from dmerge.io import storage
from dmerge.io.zarr_store import ZarrEntry, read_zarr_rows
from dmerge.numerics import torch_dtype

PAD_BLOCK_BYTES = 32 << 20  # float64 bytes of one padding-mean block (per source)


@dataclass
class RowMap:
    """Where each output row of a vocabulary tensor comes from, per source."""

    rows: int  # output rows (padded vocabulary)
    n_tokens: int  # rows at or beyond this are padding
    own: list[torch.Tensor] = field(repr=False)  # per source: int64 [stop - start]
    copy_from: torch.Tensor = field(repr=False)  # int64 [stop - start, 2]: (source, row) or (-1, -1)
    means: dict[int, tuple[tuple[int, int], ...]] = field(repr=False)  # absolute row -> terms
    block_rows: int = 0
    start: int = 0
    stop: int = -1

    def __post_init__(self):
        if self.stop < 0:
            self.stop = self.rows

    @property
    def has_padding(self) -> bool:
        return self.n_tokens < self.rows

    @property
    def byte_copyable(self) -> bool:
        """True when every row is a plain copy of one parent row (or zeros)."""
        return not self.means and not self.has_padding

    def describe(self) -> str:
        kept = sum(int((o >= 0).sum()) for o in self.own)
        filled = int((self.copy_from[:, 0] >= 0).sum())
        return (f"vocab rows {self.rows} ({self.n_tokens} tokens): {kept} source rows kept, {filled} copied from "
                f"another parent, {len(self.means)} averaged")

    def window(self, start: int, stop: int) -> "RowMap":
        """The part of the map for output rows [start, stop) (small: sent with a chunk task)."""
        a, b = start - self.start, stop - self.start
        return RowMap(
            rows=self.rows, n_tokens=self.n_tokens, own=[o[a:b].clone() for o in self.own],
            copy_from=self.copy_from[a:b].clone(),
            means={r: t for r, t in self.means.items() if start <= r < stop},
            block_rows=self.block_rows, start=start, stop=stop,
        )

    def pad_blocks(self) -> list[tuple[int, int]]:
        """Fixed row blocks over [0, n_tokens) for the padding mean."""
        step = max(1, self.block_rows)
        return [(b, min(self.n_tokens, b + step)) for b in range(0, self.n_tokens, step)]


# ---------------------------------------------------------------------------------------
# Plan time


def build_row_map(
    *,
    tensor_name: str,
    vocab: dict[str, int],
    rows: int,
    source_models: list[str],
    permutations: dict[str, list[int]],
    original_vocabs: dict[str, dict[str, int]],
    source_rows: list[int],
    base_model: str | None,
    tokens: dict[str, Any] | None,
    row_numel: int,
) -> RowMap | None:
    """The row map of one vocabulary tensor; None when every source is already in order."""
    n_tokens = len(vocab)
    S = len(source_models)
    own = []
    for s, m in enumerate(source_models):
        p = torch.tensor(permutations[m], dtype=torch.int64)
        p = torch.where(p < source_rows[s], p, torch.full_like(p, -1))
        o = torch.full((rows,), -1, dtype=torch.int64)
        o[:n_tokens] = p
        own.append(o)
    base_idx = source_models.index(base_model) if base_model in source_models else None
    configs: dict[str, Any] = dict(tokens or {})
    # Plain Python lists: this loop runs once per token of a vocabulary of 10^5.
    own_l = [o[:n_tokens].tolist() for o in own]
    copy_l: dict[int, tuple[int, int]] = {}
    means: dict[int, tuple[tuple[int, int], ...]] = {}
    forced: list[int] = []
    id_to_token = {i: t for t, i in vocab.items()}

    for tid in range(n_tokens):
        token = id_to_token[tid]
        cfg = configs.get(token)
        have = [s for s in range(S) if own_l[s][tid] >= 0]
        if cfg is None:
            if len(have) == S:
                continue  # every source has it: each keeps its own row
            if len(have) == 1:
                copy_l[tid] = (have[0], own_l[have[0]][tid])  # the only parent with the token
            elif not have:
                pass  # no parent has this token: zeros
            elif base_idx is not None and base_idx in have:
                copy_l[tid] = (base_idx, own_l[base_idx][tid])  # the base model's row
            else:
                means[tid] = tuple((s, own_l[s][tid]) for s in have)
            continue
        force = bool(getattr(cfg, "force", False))
        if not force and len(have) == S:
            continue
        src = _token_source(cfg, token, tensor_name, source_models, own_l, tid, original_vocabs, source_rows)
        if src is not None:
            copy_l[tid] = src
        if force:
            forced.append(tid)
    for tid in forced:
        for o in own:
            o[tid] = -1
    copy_from = torch.full((rows, 2), -1, dtype=torch.int64)
    if copy_l:
        idx = torch.tensor(list(copy_l), dtype=torch.int64)
        copy_from[idx] = torch.tensor(list(copy_l.values()), dtype=torch.int64)

    identity = (
        rows == n_tokens
        and all(r == rows for r in source_rows)
        and not means
        and bool((copy_from[:, 0] < 0).all())
        and all(bool((o == torch.arange(rows)).all()) for o in own)
    )
    if identity:
        return None
    block_rows = max(1, PAD_BLOCK_BYTES // max(1, 8 * row_numel))
    return RowMap(rows=rows, n_tokens=n_tokens, own=own, copy_from=copy_from, means=means, block_rows=block_rows)


def _token_source(cfg, token, tensor_name, source_models, own, tid, original_vocabs, source_rows):
    """(source index, row) a ``tokenizer.tokens`` entry asks for; None for zeros."""
    spec = cfg.source
    if isinstance(spec, dict) and spec.get("kind") == "zero":
        return None
    if isinstance(spec, dict) and spec.get("kind") == "model_token":
        model = spec.get("model")
    elif isinstance(spec, str):
        model = spec
    else:
        raise RecipeError(f"tokenizer.tokens[{token!r}]: no source given for a token some parents lack")
    if model not in source_models:
        raise RecipeError(
            f"tokenizer.tokens[{token!r}]: takes its row from {model}, which is not a source of {tensor_name}"
        )
    s = source_models.index(model)
    if isinstance(spec, dict):
        row = spec.get("token_id")
        if row is None:
            vocab = original_vocabs.get(model, {})
            if spec.get("token") not in vocab:
                raise RecipeError(f"tokenizer.tokens[{token!r}]: token {spec.get('token')!r} is not in {model}'s tokenizer")
            row = vocab[spec["token"]]
        if not 0 <= int(row) < source_rows[s]:
            raise RecipeError(f"tokenizer.tokens[{token!r}]: token id {row} is out of range for {model}")
        return s, int(row)
    if own[s][tid] < 0:
        raise RecipeError(f"tokenizer.tokens[{token!r}]: token is not in {model}'s vocabulary")
    return s, own[s][tid]


# ---------------------------------------------------------------------------------------
# Task time


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of a sorted, distinct int64 tensor."""
    if rows.numel() == 0:
        return []
    vals = rows.tolist()
    out = []
    a = prev = vals[0]
    for v in vals[1:]:
        if v != prev + 1:
            out.append((a, prev + 1))
            a = v
        prev = v
    out.append((a, prev + 1))
    return out


def needed_rows(rm: RowMap, j: int) -> torch.Tensor:
    """Distinct rows of source ``j`` that the window ``rm`` reads, sorted."""
    parts = [rm.own[j][rm.own[j] >= 0]]
    cf = rm.copy_from
    parts.append(cf[cf[:, 0] == j][:, 1])
    mean_rows = [row for terms in rm.means.values() for (s, row) in terms if s == j]
    if mean_rows:
        parts.append(torch.tensor(mean_rows, dtype=torch.int64))
    return torch.unique(torch.cat(parts))  # sorted


def read_row_set(file: str, entry, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Raw bytes of the given rows (sorted, distinct) as uint8 [len(rows), row_bytes]."""
    rb = entry.row_bytes
    buf = bytearray(len(rows) * rb)
    view = memoryview(buf)
    pos = 0
    for a, b in _runs(rows):
        n = (b - a) * rb
        if isinstance(entry, ZarrEntry):
            view[pos:pos + n] = read_zarr_rows(file, entry, a, b)[0].numpy()
        else:
            storage.read_range_into(file, entry.begin + a * rb, view[pos:pos + n])
        pos += n
    data = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return data.reshape(len(rows), rb), len(buf)


class _Gathered:
    """Rows read from each source tensor, addressable by source row."""

    def __init__(self, sources, rm: RowMap):
        self.rows: list[torch.Tensor] = []
        self.raw: list[torch.Tensor] = []
        self.nread = 0
        for j, src in enumerate(sources):
            r = needed_rows(rm, j)
            data, n = read_row_set(src.file, src.entry, r)
            self.rows.append(r)
            self.raw.append(data)
            self.nread += n

    def pos(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.rows[j], rows.contiguous())


def _decode(raw: torch.Tensor, code: str, rest: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = raw.shape[0]
    if n == 0:
        return torch.empty((0,) + rest, dtype=dtype)
    return raw.reshape(-1).view(torch_dtype(code)).reshape((n,) + rest).to(dtype)


def assemble(sources, rm: RowMap, rest: tuple[int, ...], dtype: torch.dtype, device: str,
             pad_means: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], int]:
    """Each source's rows for the window, in the output's token order (compute dtype)."""
    g = _Gathered(sources, rm)
    dec = [_decode(g.raw[j], src.entry.dtype, rest, dtype) for j, src in enumerate(sources)]
    n = rm.stop - rm.start
    out = []
    for s in range(len(sources)):
        t = torch.zeros((n,) + rest, dtype=dtype)
        _fill(t, s, rm, g, dec)
        for r, terms in rm.means.items():
            if int(rm.own[s][r - rm.start]) < 0:
                acc = torch.zeros(rest, dtype=dtype)
                for j, row in terms:
                    acc = acc + dec[j][g.pos(j, torch.tensor([row]))[0]]
                t[r - rm.start] = acc / len(terms)
        if rm.has_padding and rm.stop > rm.n_tokens:
            if pad_means is None:
                raise RuntimeError("padding rows need the padding means")
            t[max(0, rm.n_tokens - rm.start):] = pad_means[s].to(dtype)
        out.append(t.to(device))
    return out, g.nread


def _fill(t: torch.Tensor, s: int, rm: RowMap, g: _Gathered, src) -> None:
    """Own rows and single-source copies into ``t`` (decoded or raw uint8 rows)."""
    own = rm.own[s]
    m = own >= 0
    if bool(m.any()):
        t[m] = src[s][g.pos(s, own[m])]
    cf = rm.copy_from
    for j in range(len(src)):
        sel = (~m) & (cf[:, 0] == j)
        if bool(sel.any()):
            t[sel] = src[j][g.pos(j, cf[sel][:, 1])]


def gather_bytes(sources, rm: RowMap, row_bytes: int) -> tuple[torch.Tensor, int]:
    """Byte-exact gather for a copy (passthrough) of a re-indexed tensor: uint8 [n, row_bytes]."""
    g = _Gathered(sources, rm)
    out = torch.zeros((rm.stop - rm.start, row_bytes), dtype=torch.uint8)
    _fill(out, 0, rm, g, g.raw)
    return out, g.nread


def pad_partial(sources, rm: RowMap, rest: tuple[int, ...]) -> tuple[list[torch.Tensor], int]:
    """Per source, the float64 sum of the assembled rows of one padding block, and the
    bytes read for them.

    Rows are summed in order (``cumsum``), so the result does not depend on threads.
    """
    parts, nread = assemble(sources, rm, rest, torch.float64, "cpu", None)
    return [p.cumsum(0)[-1] if p.shape[0] else torch.zeros(rest, dtype=torch.float64) for p in parts], nread


def pad_finalize(n_tokens: int, partials: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Padding means from the block partials, added in block order."""
    total = [p.clone() for p in partials[0]]
    for part in partials[1:]:
        for s, p in enumerate(part):
            total[s] += p
    return [t / n_tokens for t in total]


def pad_means_of(sources, rm_full: RowMap, rest: tuple[int, ...]) -> list[torch.Tensor]:
    """All padding means in one call (same blocks and order as the distributed path)."""
    return pad_finalize(rm_full.n_tokens, [pad_partial(sources, rm_full.window(a, b), rest)[0]
                                           for a, b in rm_full.pad_blocks()])


__all__ = ["RowMap", "build_row_map", "assemble", "gather_bytes", "pad_partial", "pad_finalize", "pad_means_of"]
