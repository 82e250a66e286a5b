"""The plan: every output tensor, where its inputs are and where its bytes go.

Built from recipe + parent headers alone (no tensor data). It is plain data: print it,
test it, turn it into a Dask graph (:mod:`dmerge.graph`). For each output tensor it holds
the parents' byte locations, the method with parameters resolved for that tensor
(gradients and filters applied), the row chunking that bounds task memory, and the
output shard and byte offset of its data.

Slices, as mergekit plans them: a ``models:`` recipe is one slice over every layer of
every model. The output's *pre* tensors (embeddings) come from the first slice's
sources, its layers from each slice in turn (renumbered consecutively: slice ``k``'s
``i``-th layer is output layer ``sum(len(earlier slices)) + i``, gradients evaluated at
``t = i / (n - 1)``), its *post* tensors (final norm, output head) from the last slice's.

A slice with one source is copied (passthrough, ``scale`` allowed) when the recipe's
method needs a base model (task-vector methods, SLERP): mergekit gives the base's own
tensor there, and refuses other single-source slices; dmerge copies them too, which is
what a frankenmerge mixing merged and stacked slices means.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dmerge.architecture import LayerName, ModelLayout, architecture_key, layout_of
from dmerge.errors import InputModelError, RecipeError
from dmerge.io.model_source import ModelSource, open_model
from dmerge.io.safetensors_format import (DTYPE_NAMES, FLOAT_CODES, TORCH_NAME, TensorEntry, build_header,
                                          itemsize, promote_codes)
from dmerge.io.storage import is_url
from dmerge.methods import MergeMethod, get_method
from dmerge.recipe import ModelEntry, OutputSlice, Recipe, SliceSource, resolve_param
from dmerge.units import format_bytes
from dmerge.vocab import RowMap, build_row_map

DEFAULT_CHUNK_BYTES = 128 << 20
DEFAULT_SHARD_BYTES = 5_000_000_000
COMPUTE_ITEMSIZE = {"float64": 8, "float32": 4}

# Config lists of layer indices (not one entry per layer), remapped for a new layer order.
LAYER_INDEX_LISTS = ("mlp_only_layers",)


@dataclass(frozen=True)
class SourceTensor:
    """One parent tensor feeding an output tensor."""

    model: str  # recipe reference
    file: str  # local path or URL
    entry: TensorEntry

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass(frozen=True)
class ComputedSource:
    """Where an output tensor without parent bytes comes from: result ``part`` of the
    plan's computation ``computation`` (an index into :attr:`Plan.computations`). MoE
    routers are such tensors: a chain of tasks computes them from prompts, one decoder
    layer at a time, and they are then written like any other tensor."""

    computation: int
    part: str


@dataclass
class TensorPlan:
    """One output tensor: inputs, method + resolved parameters, chunks, destination.

    Two kinds: tensors made from parent bytes (``sources``, copied or merged by
    ``method``), and *computed* tensors (``computed`` set, no sources, method
    ``"computed"``), whose values a computation of the plan produces."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # output safetensors dtype code
    method: str
    sources: list[SourceTensor]
    base_index: int | None
    params: dict
    model_params: list[dict]
    rows_per_chunk: int
    copy_bytes: bool  # no arithmetic: bytes are copied as they are
    task_bytes: int  # estimated peak memory of one chunk task
    shard: int = -1
    offset: int = -1  # absolute byte offset of the data in the shard file
    # Vocabulary tensors re-indexed for a merged tokenizer: which source row feeds each
    # output row (see dmerge.vocab). None: output row r is row r of every source.
    row_map: RowMap | None = field(default=None, repr=False)
    computed: ComputedSource | None = None
    # Leading dimensions that count as rows for chunking: 2 for a stacked [experts, out,
    # in] tensor, so a chunk is a range of its experts' rows and stays within the budget.
    row_ndim: int = 1
    # A tensor assembled from several parents' tensors (a MoE's packed experts): output
    # rows [out_row, out_row + piece.rows) are ``piece`` (a TensorPlan of the part, as
    # if it were its own tensor), in row order. Its chunks are written piece by piece.
    pieces: tuple[tuple[int, "TensorPlan"], ...] | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:self.row_ndim]) if self.shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.rows / self.rows_per_chunk))

    def chunk_rows(self, i: int) -> tuple[int, int]:
        start = i * self.rows_per_chunk
        return start, min(self.rows, start + self.rows_per_chunk)

    @property
    def bytes_read(self) -> int:
        return sum(self.source_bytes_read(s) for s in self.sources)

    def source_bytes_read(self, source) -> int:
        """Bytes one pass over the tensor reads of ``source``."""
        if self.row_map is None and self.shape:
            # Rows past the output's are never read (--unsafe-truncate-embeddings).
            return min(source.entry.nbytes, source.entry.row_bytes * self.rows)
        return source.entry.nbytes

    def describe(self) -> str:
        """One line for `dmerge plan --tensors`."""
        srcs = ", ".join(f"{s.model}:{s.name}" for s in self.sources)
        if self.computed is not None:
            srcs = f"computed {self.computed.part}"
        if self.pieces is not None:
            srcs = f"{len(self.pieces)} pieces: " + srcs
        how = "copy" if self.copy_bytes else self.method
        extra = f" [{self.row_map.describe()}]" if self.row_map is not None else ""
        return f"{self.name} {list(self.shape)} {self.dtype} {how} chunks={self.n_chunks} <- {srcs}{extra}"


@dataclass
class ShardPlan:
    name: str  # final file name
    header: bytes = field(repr=False)
    size: int
    tensors: list[int]  # indices into Plan.tensors


@dataclass(frozen=True)
class LayerOrigin:
    """Where output layer ``index`` comes from: layer ``source_index`` of ``model`` (the
    first source of its slice), merged with ``others`` (model, layer) when the slice has
    several sources."""

    index: int
    model: str
    source_index: int
    slice_index: int
    others: tuple[tuple[str, int], ...] = ()


@dataclass
class Plan:
    """A whole merge, ready to be turned into tasks."""

    recipe: Recipe = field(repr=False)
    method: str
    models: dict[str, ModelSource] = field(repr=False)
    tensors: list[TensorPlan]
    shards: list[ShardPlan]
    out_config: dict = field(repr=False)
    chunk_bytes: int
    compute_dtype: str
    seed: int = 0
    allow_nan: bool = False
    device: str = "cpu"
    layers: list[LayerOrigin] = field(default_factory=list, repr=False)
    tokenizer: object | None = field(default=None, repr=False)  # dmerge.tokenizer.MergedTokenizer
    architecture: str = ""
    chat_template: str | None = field(default=None, repr=False)
    trust_remote_code: bool = False  # tokenizers loaded again when the output is written
    # What computed tensors come from (see ComputedSource): objects with ``fingerprint()``,
    # ``n_tasks``, ``bytes_read``, ``peak_task_bytes``, ``describe()`` and
    # ``tasks(key_name, device) -> (graph, {part: key}, report key or None)``.
    computations: list = field(default_factory=list, repr=False)

    @property
    def n_tasks(self) -> int:
        """Graph keys of the run (the same code as :func:`dmerge.graph.build_graph` decides them)."""
        from dmerge.graph import count_tasks

        return count_tasks(self)

    @property
    def parent_bytes(self) -> int:
        """Bytes of the parent tensors the output is made from (each counted once)."""
        return sum(t.bytes_read for t in self.tensors)

    @property
    def reads(self) -> tuple[int, int]:
        """Parent bytes the run will fetch: (certainly, at most); passes over the data that
        statistics need count again (see :func:`dmerge.graph.estimate_reads`)."""
        from dmerge.graph import estimate_reads

        return estimate_reads(self)

    @property
    def bytes_read(self) -> int:
        """Parent bytes the run will certainly fetch (see :attr:`reads`)."""
        return self.reads[0]

    def fingerprint(self) -> str:
        """A short hash of everything that decides the output's bytes and their places:
        the run id in graph keys (two merges on one scheduler never share a key; a
        resumed run of the same plan recognises its own)."""
        h = hashlib.sha256()
        h.update(repr((self.method, self.compute_dtype, self.seed, self.allow_nan)).encode())
        for t in self.tensors:
            srcs = [(s.model, s.file, s.entry.dtype, s.entry.shape, s.entry.begin, s.entry.end) for s in t.sources]
            h.update(repr((t.name, t.shape, t.dtype, t.method, t.base_index, sorted(t.params.items()),
                           [sorted(p.items()) for p in t.model_params], t.rows_per_chunk, t.copy_bytes,
                           t.shard, t.offset, srcs)).encode())
            if t.computed is not None:
                h.update(repr(t.computed).encode())
            if t.pieces is not None:
                h.update(repr([(row, p.name, p.method, p.model_params, p.copy_bytes, p.rows_per_chunk)
                               for row, p in t.pieces]).encode())
            if t.row_map is not None:
                rm = t.row_map
                for part in rm.own + [rm.copy_from]:
                    h.update(part.numpy().tobytes())
                h.update(repr((rm.rows, rm.n_tokens, sorted(rm.means.items()), rm.block_rows)).encode())
        for shard in self.shards:
            h.update(shard.name.encode())
            h.update(shard.header)
        for c in self.computations:
            h.update(c.fingerprint().encode())
        return h.hexdigest()[:16]

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def peak_task_bytes(self) -> int:
        return max([t.task_bytes for t in self.tensors] + [c.peak_task_bytes for c in self.computations], default=0)

    def layer_summary(self) -> list[str]:
        """Output layer ranges and where they come from, one line per run."""
        out = []
        run: list[LayerOrigin] = []
        for lo in self.layers + [None]:
            if run and (lo is None or lo.slice_index != run[-1].slice_index or lo.model != run[-1].model
                        or lo.source_index != run[-1].source_index + 1):
                a, b = run[0], run[-1]
                srcs = [f"{a.model} layers {a.source_index}-{b.source_index}"]
                srcs += [f"{m} layers {i}-{j[1]}" for (m, i), j in zip(a.others, b.others)]
                how = f"{self.method} of " if len(srcs) > 1 else ""
                out.append(f"{a.index}-{b.index} <- {how}{' + '.join(srcs)}")
                run = []
            if lo is not None:
                run.append(lo)
        return out

    def _describe_reads(self) -> str:
        certain, at_most = self.reads
        parents = self.parent_bytes
        text = f"{format_bytes(certain)} ({certain} B)"
        if certain != parents:
            text += f", {certain / parents:.2f}x the {format_bytes(parents)} of parent tensors" if parents else ""
        if at_most > certain:
            text += (f"; up to {format_bytes(at_most)} where a statistic needs a second look"
                     + (" or the spill of remote bytes misses" if any(is_url(m.location) for m in
                                                                      self.models.values()) else ""))
        return text

    def summary(self) -> str:
        """What `dmerge plan` prints: counts, bytes and memory, and the output shards."""
        lines = [
            f"method:            {self.method}",
            f"architecture:      {self.architecture}",
            f"parents:           {len(self.models)} ({', '.join(self.models)})",
            f"output layers:     {len(self.layers)}",
        ]
        lines += [f"  {line}" for line in self.layer_summary()]
        if self.tokenizer is not None:
            lines.append(f"tokenizer:         {self.tokenizer.describe()}")
        lines += [f"computed:          {c.describe()}" for c in self.computations]
        lines += [
            f"output tensors:    {len(self.tensors)}",
            f"tasks:             {self.n_tasks} (chunk budget {format_bytes(self.chunk_bytes)}, compute {self.compute_dtype})",
            f"bytes to read:     {self._describe_reads()}",
            f"bytes to write:    {format_bytes(self.bytes_written)} ({self.bytes_written} B)",
            f"peak memory/task:  {format_bytes(self.peak_task_bytes)}",
            f"output shards:     {len(self.shards)}",
        ]
        for s in self.shards:
            lines.append(f"  {s.name}  {format_bytes(s.size)}  {len(s.tensors)} tensors")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A slice source resolved against its model."""

    spec: SliceSource
    model: ModelSource
    layout: ModelLayout


def _dtype_code(name: str | None) -> str | None:
    return DTYPE_NAMES[name] if name else None


def output_dtype(tensor_name: str, sources: list[SourceTensor], out_dtype: str | None) -> str:
    """The safetensors dtype one output tensor is written in, by mergekit's rules.

    The recipe's ``out_dtype``, else its ``dtype`` (``out_dtype`` here is whichever is
    given); with neither, the sources' dtypes promoted as torch promotes them (bf16 + fp32
    -> fp32, bf16 + fp16 -> fp32), so the order the parents are listed in does not matter.
    Integer buffers keep their dtype: they are copied, never converted.
    """
    first = sources[0].entry.dtype
    if first not in FLOAT_CODES:
        return first
    if out_dtype:
        return out_dtype
    promoted = first
    for s in sources[1:]:
        promoted = promote_codes(promoted, s.entry.dtype)
        if promoted is None:  # float8 types promote with nothing but themselves
            raise InputModelError(
                f"tensor {tensor_name}: {sources[0].model} stores {first}, {s.model} stores {s.entry.dtype}, "
                f"which have no common dtype; set dtype or out_dtype in the recipe"
            )
    return promoted


def open_models(recipe: Recipe) -> dict[str, ModelSource]:
    """Open every parent named by the recipe (metadata only), concurrently."""
    refs = recipe.referenced_models()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(refs)))) as pool:
        models = list(pool.map(lambda r: open_model(r, recipe.source_dir), refs))
    return dict(zip(refs, models))


def model_layout(model: ModelSource) -> ModelLayout:
    shapes = {n: loc.entry.shape for n, loc in model.tensors.items()}
    return layout_of(shapes, model.reference, model.config, model.num_layers)


def _layout(model: ModelSource, cache: dict) -> ModelLayout:
    if model.reference not in cache:
        cache[model.reference] = model_layout(model)
    return cache[model.reference]


def check_architectures(models: dict[str, ModelSource], layouts: dict, allow_crimes: bool) -> str:
    """All parents must share an architecture unless crimes are allowed; returns it."""
    keys = {ref: architecture_key(m.config, _layout(m, layouts)) for ref, m in models.items()}
    distinct = list(dict.fromkeys(keys.values()))
    if len(distinct) > 1 and not allow_crimes:
        detail = ", ".join(f"{ref} is {k}" for ref, k in keys.items())
        raise RecipeError(f"the models mix architectures ({detail}); pass --allow-crimes to merge them anyway")
    return " + ".join(distinct)


def normalized_slices(recipe: Recipe, models: dict[str, ModelSource], layouts: dict) -> list[OutputSlice]:
    """``models:`` recipes become one slice over all layers (base appended if missing)."""
    if recipe.slices:
        return recipe.slices
    sources = []
    names = [m.model for m in recipe.models]
    entries = list(recipe.models)
    if recipe.base_model and recipe.base_model not in names:
        entries.append(ModelEntry(model=recipe.base_model))
    for e in entries:
        n = _layout(models[e.model], layouts).num_layers
        sources.append(SliceSource(model=e.model, layer_range=(0, n), parameters=e.parameters))
    return [OutputSlice(sources=sources)]


@dataclass
class PlanContext:
    """What every planner of one run shares: the recipe, its parents (metadata only),
    their layouts, the output dtype, the tokenizer and the budgets."""

    recipe: Recipe
    models: dict[str, ModelSource]
    layouts: dict[str, ModelLayout]
    architecture: str
    out_dtype: str | None  # safetensors code named by the recipe (out_dtype, else dtype), or None
    chunk_bytes: int
    compute_dtype: str
    tokenizer: object | None = None  # dmerge.tokenizer.MergedTokenizer
    chat_template: str | None = None
    unsafe_truncate_embeddings: bool = False

    @property
    def compute_itemsize(self) -> int:
        return COMPUTE_ITEMSIZE[self.compute_dtype]

    def layout(self, ref: str) -> ModelLayout:
        return _layout(self.models[ref], self.layouts)


def open_context(recipe: Recipe, *, models: dict[str, ModelSource] | None, chunk_bytes: int, compute_dtype: str,
                 allow_crimes: bool | None, unsafe_truncate_embeddings: bool = False,
                 trust_remote_code: bool = False, with_tokenizer: bool = True) -> PlanContext:
    """Step 1 of planning: open the parents, check their architectures agree, and build
    the recipe's tokenizer and chat template (metadata and tokenizer files only)."""
    from dmerge.tokenizer import build_tokenizer, resolve_chat_template

    models = models if models is not None else open_models(recipe)
    layouts: dict[str, ModelLayout] = {}
    crimes = recipe.allow_crimes if allow_crimes is None else allow_crimes
    architecture = check_architectures(models, layouts, crimes)
    tokenizer = chat_template = None
    if with_tokenizer:
        tokenizer = build_tokenizer(recipe, models, layouts, trust_remote_code=trust_remote_code)
        chat_template = resolve_chat_template(recipe.chat_template, models, trust_remote_code)
    return PlanContext(recipe=recipe, models=models, layouts=layouts, architecture=architecture,
                       out_dtype=_dtype_code(recipe.out_dtype) or _dtype_code(recipe.dtype), chunk_bytes=chunk_bytes,
                       compute_dtype=compute_dtype, tokenizer=tokenizer, chat_template=chat_template,
                       unsafe_truncate_embeddings=unsafe_truncate_embeddings)


def source_tensors(sources: list[tuple[ModelSource, str]]) -> list[SourceTensor]:
    """The byte locations of the parent tensors ``(model, tensor name)`` that feed one output tensor."""
    out = []
    for model, name in sources:
        loc = model.tensor(name)
        out.append(SourceTensor(model.reference, loc.file, loc.entry))
    return out


def task_memory(out_shape: tuple[int, ...], dtype: str, sources: list[SourceTensor], method: MergeMethod, *,
                copy: bool, row_mapped: bool, compute_itemsize: int, chunk_bytes: int) -> tuple[int, int]:
    """The memory model of one output tensor's tasks: (bytes one output row costs a task,
    rows per chunk so that a task stays within ``chunk_bytes``).

    A byte copy holds the output rows (twice when rows are gathered through a row map);
    arithmetic holds every parent's rows in their stored dtype, their widened copies
    (unless the method widens per cache-sized block), the method's temporaries and the
    rounded result. Vectors are one task each.
    """
    numel_row = math.prod(out_shape[1:]) if len(out_shape) > 1 else 1
    rows = out_shape[0] if out_shape else 1
    out_item = itemsize(dtype)
    if copy:
        per_row = numel_row * out_item * (2 if row_mapped else 1)
    else:
        in_items = sum(itemsize(s.entry.dtype) for s in sources)
        blocked = method.raw_inputs or (method.elementwise and not method.statistics)
        converted = 0 if blocked else len(sources)  # blocked methods widen per cache-sized block
        per_row = numel_row * (in_items + (converted + method.work_tensors) * compute_itemsize + out_item)
    if len(out_shape) < 2:  # vectors are small: one task each
        rows_per_chunk = rows
    else:
        rows_per_chunk = max(1, min(rows, chunk_bytes // max(1, per_row)))
    return per_row, rows_per_chunk


def is_byte_copy(method: MergeMethod, sources: list[SourceTensor], dtype: str, model_params: list[dict],
                 row_map: RowMap | None = None) -> bool:
    """Whether an output tensor is its parent's bytes as they are (no decoding, no arithmetic)."""
    return (
        method.copies_bytes
        and all(s.entry.dtype == dtype for s in sources)
        and all(mp.get("scale") is None for mp in model_params)
        and (row_map is None or row_map.byte_copyable)
    )


class MergePlanner:
    """Plans the output tensors of a merge recipe (``models:`` or ``slices:``): embeddings
    from the first slice, each slice's layers in turn, final norm and head from the last.
    Each output tensor goes through the same named steps (:meth:`plan_tensor`)."""

    def __init__(self, ctx: PlanContext):
        self.ctx = ctx
        self.recipe = ctx.recipe
        self.method = get_method(ctx.recipe.merge_method)
        self.copy_method = get_method("passthrough")
        self.tensors: list[TensorPlan] = []
        self.origins: list[LayerOrigin] = []
        self._seen: set[str] = set()
        self.head_name: str | None = None
        self.embed_name: str | None = None

    # -- the steps of one output tensor -------------------------------------------------

    def method_for(self, n_sources: int) -> MergeMethod:
        """One source with a method that needs a base: a copy (see the module docstring)."""
        return self.copy_method if (n_sources == 1 and self.method.requires_base) else self.method

    def vocab_row_map(self, out_name: str, src: list[SourceTensor], base_ref: str | None) -> RowMap:
        """The row map of a vocabulary tensor re-indexed for the recipe's tokenizer."""
        tokenizer = self.ctx.tokenizer
        first = src[0].entry
        for s in src[1:]:
            if s.entry.shape[1:] != first.shape[1:]:
                raise InputModelError(
                    f"tensor {out_name}: {src[0].model} has shape {list(first.shape)}, {s.model} has "
                    f"{list(s.entry.shape)}; only the vocabulary dimension may differ"
                )
        return build_row_map(
            tensor_name=out_name, vocab=tokenizer.vocab, rows=tokenizer.rows,
            source_models=[s.model for s in src], permutations=tokenizer.permutations,
            original_vocabs=tokenizer.original_vocabs, source_rows=[s.entry.rows for s in src],
            base_model=base_ref, tokens=tokenizer.spec.tokens, row_numel=math.prod(first.shape[1:]),
        )

    def output_shape(self, out_name: str, src: list[SourceTensor], row_map: RowMap | None,
                     vocab: bool) -> tuple[tuple[int, ...], bool]:
        """The output tensor's shape, and whether vocabulary rows are truncated to the
        rows every parent has (``--unsafe-truncate-embeddings``)."""
        first = src[0].entry
        out_shape = (self.ctx.tokenizer.rows,) + tuple(first.shape[1:]) if row_map is not None else first.shape
        truncate = vocab and self.ctx.tokenizer is None and self.ctx.unsafe_truncate_embeddings and len(first.shape) >= 2
        if truncate:
            out_shape = (min(s.entry.rows for s in src),) + tuple(first.shape[1:])
            if any(s.entry.rows != out_shape[0] for s in src):
                sizes = ", ".join(f"{s.model} {s.entry.rows}" for s in src)
                warnings.warn(f"--unsafe-truncate-embeddings: {out_name} keeps the first {out_shape[0]} rows of each "
                              f"parent ({sizes}); token ids must mean the same in that prefix", stacklevel=3)
        return tuple(out_shape), truncate

    @staticmethod
    def check_shapes(out_name: str, src: list[SourceTensor], truncate: bool, vocab: bool) -> None:
        """Parents must agree on the shape (on all but the vocabulary dimension when truncating)."""
        first = src[0].entry
        for s in src[1:]:
            if (s.entry.shape[1:] != first.shape[1:]) if truncate else (s.entry.shape != first.shape):
                hint = " (different vocabularies: set tokenizer_source, e.g. union or base)" if vocab else ""
                raise InputModelError(
                    f"tensor {out_name}: shape mismatch: {src[0].model} has {list(first.shape)}, "
                    f"{s.model} has {list(s.entry.shape)}{hint}"
                )

    @staticmethod
    def check_dtypes(src: list[SourceTensor], m: MergeMethod) -> None:
        for s in src:
            if s.entry.dtype not in FLOAT_CODES and not m.copies_bytes:
                raise InputModelError(
                    f"tensor {s.name} of {s.model} has dtype {s.entry.dtype}; {m.name} needs floating-point tensors"
                )

    def base_index(self, out_name: str, sources: list[tuple[_Source, str]], m: MergeMethod,
                   base_ref: str | None) -> int | None:
        """Which source is the base model (for task-vector methods), checked present where needed."""
        index = None
        if base_ref is not None and m is self.method:
            matches = [i for i, (src, _) in enumerate(sources) if src.spec.model == base_ref]
            index = matches[0] if matches else None
        if m.requires_base and index is None:
            raise RecipeError(f"tensor {out_name}: base_model {base_ref} is not among the sources of its slice")
        return index

    def parameters(self, out_name: str, sources: list[tuple[_Source, str]], m: MergeMethod, out_slice: OutputSlice,
                   t: float, base_index: int | None) -> tuple[dict, list[dict]]:
        """The method's shared and per-model parameters resolved for this tensor (filters
        against the output name for shared ones, the input name for per-model ones;
        gradients at depth ``t``), then the method's own plan-time check."""
        shared_scopes = [out_slice.parameters, self.recipe.parameters]
        params = {p.name: resolve_param(p, shared_scopes, out_name, t) for p in m.params}
        model_params = []
        for i, (src, in_name) in enumerate(sources):
            scopes = [src.spec.parameters, out_slice.parameters, self.recipe.parameters]
            mp = {}
            for p in m.model_params:
                if i == base_index and not p.for_base:
                    mp[p.name] = None
                else:
                    mp[p.name] = resolve_param(p, scopes, in_name, t)
            model_params.append(mp)
        if m.check is not None:
            problem = m.check(params, model_params)
            if problem:
                raise RecipeError(f"tensor {out_name}: {problem}")
        return params, model_params

    def add(self, tp: TensorPlan) -> None:
        """Append a planned output tensor (each name once)."""
        if tp.name in self._seen:
            raise RecipeError(f"output tensor {tp.name} would be written twice")
        self._seen.add(tp.name)
        self.tensors.append(tp)

    def plan_tensor(self, out_name: str, sources: list[tuple[_Source, str]], out_slice: OutputSlice, t: float,
                    vocab: bool = False) -> None:
        """Plan one output tensor from ``(source, input tensor name)`` pairs at depth ``t``."""
        m = self.method_for(len(sources))
        base_ref = out_slice.base_model or self.recipe.base_model
        src = source_tensors([(s.model, name) for s, name in sources])
        row_map = self.vocab_row_map(out_name, src, base_ref) if vocab and self.ctx.tokenizer is not None else None
        out_shape, truncate = self.output_shape(out_name, src, row_map, vocab)
        if row_map is None:
            self.check_shapes(out_name, src, truncate, vocab)
        self.check_dtypes(src, m)
        base_index = self.base_index(out_name, sources, m, base_ref)
        params, model_params = self.parameters(out_name, sources, m, out_slice, t, base_index)
        dtype = output_dtype(out_name, src, self.ctx.out_dtype)
        copy = is_byte_copy(m, src, dtype, model_params, row_map)
        per_row, rows_per_chunk = task_memory(out_shape, dtype, src, m, copy=copy, row_mapped=row_map is not None,
                                              compute_itemsize=self.ctx.compute_itemsize,
                                              chunk_bytes=self.ctx.chunk_bytes)
        self.add(TensorPlan(name=out_name, shape=out_shape, dtype=dtype, method=m.name, sources=src,
                            base_index=base_index, params=params, model_params=model_params,
                            rows_per_chunk=rows_per_chunk, copy_bytes=copy, task_bytes=per_row * rows_per_chunk,
                            row_map=row_map))

    # -- the walk over slices -----------------------------------------------------------

    def resolve_slices(self, slices: list[OutputSlice]) -> list[tuple[OutputSlice, list[_Source]]]:
        """Each slice's sources against their models, layer ranges checked."""
        resolved = []
        for si, s in enumerate(slices):
            srcs = []
            for spec in s.sources:
                if spec.model not in self.ctx.models:
                    raise RecipeError(f"model {spec.model} is not known")
                m = self.ctx.models[spec.model]
                lay = _layout(m, self.ctx.layouts)
                if spec.layer_range[1] > lay.num_layers:
                    raise RecipeError(
                        f"slices[{si}]: layer_range {list(spec.layer_range)} of {spec.model} is out of range: "
                        f"it has {lay.num_layers} layers"
                    )
                srcs.append(_Source(spec, m, lay))
            lengths = {src.spec.layer_range[1] - src.spec.layer_range[0] for src in srcs}
            if len(lengths) > 1:
                what = "models" if not self.recipe.slices else f"slices[{si}] sources"
                raise RecipeError(f"{what} must all have the same number of layers, got {sorted(lengths)}")
            resolved.append((s, srcs))
        return resolved

    def plan_pre(self, first_slice: OutputSlice, first_srcs: list[_Source]) -> None:
        """Pre weights (embeddings) from the first slice's sources, at t = 0."""
        lead = first_srcs[0].layout
        self.embed_name = lead.embedding
        for name in lead.pre:
            self.plan_tensor(name, [(src, _same_role(src.layout, lead, name)) for src in first_srcs], first_slice,
                             0.0, vocab=name in lead.vocab)

    def plan_layers(self, si: int, out_slice: OutputSlice, srcs: list[_Source]) -> None:
        """One slice's layers, renumbered after the layers planned so far."""
        n = srcs[0].spec.layer_range[1] - srcs[0].spec.layer_range[0]
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            lead_src = srcs[0]
            out_index = len(self.origins)
            lead_names: list[LayerName] = lead_src.layout.layers.get(lead_src.spec.layer_range[0] + i, [])
            for ln in lead_names:
                inputs = []
                for src in srcs:
                    idx = src.spec.layer_range[0] + i
                    inputs.append((src, f"{_prefix_of(src.layout, idx, ln)}.{idx}.{ln.suffix}"))
                self.plan_tensor(ln.renumbered(out_index), inputs, out_slice, t)
            others = tuple((src.spec.model, src.spec.layer_range[0] + i) for src in srcs[1:])
            self.origins.append(LayerOrigin(out_index, lead_src.spec.model, lead_src.spec.layer_range[0] + i, si,
                                            others))

    def plan_post(self, last_slice: OutputSlice, last_srcs: list[_Source]) -> None:
        """Post weights (final norm, output head) from the last slice's sources, at t = 0."""
        lead = last_srcs[0].layout
        post = list(lead.post)
        with_head = [src for src in last_srcs if src.layout.head is not None]
        head_name = lead.head_name or (with_head[0].layout.head if with_head else None)
        self.head_name = head_name
        if head_name and with_head and head_name not in post:
            post.append(head_name)  # the lead is tied but another source has a head
        for name in post:
            if head_name is not None and name == head_name:
                inputs = []
                for src in last_srcs:
                    own = src.layout.head or src.layout.embedding  # tied: the embedding stands in
                    if own is None:
                        raise InputModelError(f"model {src.spec.model} has neither an output head nor a token embedding")
                    inputs.append((src, own))
                self.plan_tensor(name, inputs, last_slice, 0.0, vocab=True)
            else:
                self.plan_tensor(name, [(src, _same_role(src.layout, lead, name)) for src in last_srcs], last_slice,
                                 0.0, vocab=name in lead.vocab)

    def plan_all(self) -> tuple[list[OutputSlice], list[TensorPlan]]:
        """Every output tensor of the recipe, in mergekit's order."""
        slices = normalized_slices(self.recipe, self.ctx.models, self.ctx.layouts)
        resolved = self.resolve_slices(slices)
        self.plan_pre(*resolved[0])
        for si, (out_slice, srcs) in enumerate(resolved):
            self.plan_layers(si, out_slice, srcs)
        self.plan_post(*resolved[-1])
        if not self.tensors:
            raise InputModelError("the recipe selects no tensors")
        return slices, self.tensors


def check_vocabularies(tensors: list[TensorPlan], embed_name: str | None, head_name: str | None,
                       tokenizer) -> tuple[TensorPlan | None, TensorPlan | None]:
    """The planned embedding and head; without a recipe tokenizer they must have the same rows."""
    by_name = {t.name: t for t in tensors}
    embed = by_name.get(embed_name) if embed_name else None
    head = by_name.get(head_name) if head_name else None
    if tokenizer is None and embed is not None and head is not None and embed.rows != head.rows:
        raise InputModelError(
            f"the embedding ({embed.sources[0].model}, {embed.rows} rows) and the output head "
            f"({head.sources[0].model}, {head.rows} rows) have different vocabularies; set tokenizer_source"
        )
    return embed, head


def build_plan(
    recipe: Recipe,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compute_dtype: str = "float64",
    models: dict[str, ModelSource] | None = None,
    seed: int = 0,
    allow_nan: bool = False,
    device: str = "cpu",
    allow_crimes: bool | None = None,
    unsafe_truncate_embeddings: bool = False,
    trust_remote_code: bool = False,
) -> Plan:
    """Plan a merge from the recipe and the parents' headers (no tensor data is read).

    The steps: open the parents and the tokenizer (:func:`open_context`), plan every
    output tensor (:class:`MergePlanner`, or :class:`dmerge.moe.plan.MoEPlanner` for
    ``merge_method: moe``), check the vocabularies agree, then lay the tensors out in
    shards and write the output config (:func:`assemble_plan`).

    ``unsafe_truncate_embeddings``: as mergekit's option of that name, when the recipe
    builds no tokenizer, vocabulary tensors (embedding, output head) whose parents have
    different numbers of rows keep only the rows all parents have (the smallest
    vocabulary, a prefix of each), assuming token ids mean the same in that prefix.
    ``trust_remote_code``: tokenizers that ship their own code may run it.
    """
    if recipe.merge_method == "moe":
        from dmerge.moe.plan import build_moe_plan

        return build_moe_plan(recipe, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, compute_dtype=compute_dtype,
                              models=models, seed=seed, allow_nan=allow_nan, device=device,
                              allow_crimes=allow_crimes, trust_remote_code=trust_remote_code)
    method = get_method(recipe.merge_method)
    ctx = open_context(recipe, models=models, chunk_bytes=chunk_bytes, compute_dtype=compute_dtype,
                       allow_crimes=allow_crimes, unsafe_truncate_embeddings=unsafe_truncate_embeddings,
                       trust_remote_code=trust_remote_code)
    planner = MergePlanner(ctx)
    slices, tensors = planner.plan_all()
    embed, head = check_vocabularies(tensors, planner.embed_name, planner.head_name, ctx.tokenizer)
    out_config = _output_config(recipe, ctx.models, ctx.layouts, slices, planner.origins, tensors, ctx.tokenizer,
                                head_written=head is not None, embed=embed)
    return assemble_plan(ctx, method.name, tensors, out_config, shard_bytes=shard_bytes, seed=seed,
                         allow_nan=allow_nan, device=device, layers=planner.origins,
                         trust_remote_code=trust_remote_code)


def assemble_plan(ctx: PlanContext, method: str, tensors: list[TensorPlan], out_config: dict, *, shard_bytes: int,
                  seed: int, allow_nan: bool, device: str, layers: list[LayerOrigin],
                  trust_remote_code: bool, computations: list | None = None) -> Plan:
    """The last step: tensors laid out in shards (byte offsets fixed), and the Plan."""
    shards = _assign_shards(tensors, shard_bytes)
    return Plan(
        recipe=ctx.recipe,
        method=method,
        models=ctx.models,
        tensors=tensors,
        shards=shards,
        out_config=out_config,
        chunk_bytes=ctx.chunk_bytes,
        compute_dtype=ctx.compute_dtype,
        seed=seed,
        allow_nan=allow_nan,
        device=device,
        layers=layers,
        tokenizer=ctx.tokenizer,
        architecture=ctx.architecture,
        chat_template=ctx.chat_template,
        trust_remote_code=trust_remote_code,
        computations=list(computations or []),
    )

def _same_role(layout: ModelLayout, lead: ModelLayout, name: str) -> str:
    """The name of the tensor in ``layout`` that plays the role ``name`` plays in ``lead``."""
    if name == lead.embedding and layout.embedding:
        return layout.embedding
    return name


def _prefix_of(layout: ModelLayout, index: int, like: LayerName) -> str:
    for ln in layout.layers.get(index, []):
        if ln.suffix == like.suffix:
            return ln.prefix
    return like.prefix


def _assign_shards(tensors: list[TensorPlan], shard_bytes: int) -> list[ShardPlan]:
    """Greedy, in plan order, as mergekit/transformers do: start a new shard when full."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if groups[-1] and size + t.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += t.nbytes
    n = len(groups)
    shards = []
    for k, idxs in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        header, offsets = build_header(
            [(tensors[i].name, tensors[i].dtype, tensors[i].shape) for i in idxs],
            {"format": "pt", "merged_by": "dmerge"},
        )
        for i, (b, _e) in zip(idxs, offsets):
            tensors[i].shard = k
            tensors[i].offset = len(header) + b
        size = len(header) + (offsets[-1][1] if offsets else 0)
        shards.append(ShardPlan(name=name, header=header, size=size, tensors=idxs))
    return shards


def _text_part(cfg: dict) -> dict:
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg


def _output_config(recipe: Recipe, models: dict[str, ModelSource], layouts: dict, slices,
                   origins: list[LayerOrigin], tensors, tokenizer, *, head_written: bool, embed) -> dict:
    """config.json of the output: the base (or first) model's, with dtype, depth, per-layer
    settings, vocabulary size and embedding tying updated for what was written."""
    ref = recipe.base_model or slices[0].sources[0].model
    cfg = copy.deepcopy(models[ref].config)
    family = layouts[ref].family
    # The recipe's dtype, as mergekit writes it; without one, what most tensors were written
    # in (mergekit keeps the parent's, which misdescribes promoted tensors), ties to the wider.
    float_dtypes = [t.dtype for t in tensors if t.dtype in TORCH_NAME]
    named = _dtype_code(recipe.out_dtype) or _dtype_code(recipe.dtype)
    if named or float_dtypes:
        name = TORCH_NAME[named or max(sorted(set(float_dtypes)), key=lambda c: (float_dtypes.count(c), itemsize(c)))]
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
    target = _text_part(cfg)
    ref_layers = layouts[ref].num_layers
    n_layers = len(origins)
    if n_layers:
        keys = [family.layers_key, "num_hidden_layers", "n_layer", "num_layers", "n_layers"]
        for key in keys:
            if isinstance(target.get(key), int):
                target[key] = n_layers
                break
        identity = all(o.model == ref and o.source_index == o.index for o in origins) and n_layers == ref_layers
        if not identity:
            _remap_layer_lists(target, ref_layers, origins, models, layouts)
    vocab_key = family.vocab_key
    if tokenizer is not None:
        target[vocab_key] = tokenizer.rows
    elif embed is not None and isinstance(target.get(vocab_key), int) and target[vocab_key] != embed.rows:
        target[vocab_key] = embed.rows
    if family.heads and not family.inferred:
        # Written explicitly: with an output head in the checkpoint the model must not
        # tie it to the embedding, and without one it must.
        where = target if (family.tie_key in target and family.tie_key not in cfg) else cfg
        where[family.tie_key] = not head_written
    return cfg


def _remap_layer_lists(target: dict, ref_layers: int, origins: list[LayerOrigin], models, layouts) -> None:
    """Per-layer config lists (``layer_types``, ...) follow the layers to their new places."""
    for key, value in list(target.items()):
        if not isinstance(value, list) or "layer" not in key:
            continue
        if key in LAYER_INDEX_LISTS:
            new = []
            for o in origins:
                src = _text_part(models[o.model].config).get(key)
                if isinstance(src, list) and o.source_index in src:
                    new.append(o.index)
            target[key] = new
        elif len(value) == ref_layers and ref_layers > 0:
            new = []
            for o in origins:
                src = _text_part(models[o.model].config).get(key)
                if isinstance(src, list) and len(src) == layouts[o.model].num_layers:
                    new.append(src[o.source_index])
                else:
                    new.append(value[min(o.source_index, len(value) - 1)])
            target[key] = new


__all__ = ["Plan", "TensorPlan", "ComputedSource", "PlanContext", "MergePlanner", "open_context", "assemble_plan",
           "task_memory", "is_byte_copy", "source_tensors", "ShardPlan", "SourceTensor", "LayerOrigin", "build_plan", "open_models",
           "MergeMethod", "model_layout"]
