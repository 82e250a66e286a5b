"""The plan: every output tensor, where its inputs are and where its bytes go.

Built from recipe + parent headers alone (no tensor data). It is plain data: print it,
test it, turn it into a Dask graph (:mod:`dmerge.graph`). For each output tensor it holds
the parents' byte locations, the method with parameters resolved for that tensor
(gradients and filters applied), the row chunking that bounds task memory, and the
output shard and byte offset of its data.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dmerge.architecture import LayerName, ModelLayout, layout_of
from dmerge.errors import InputModelError, RecipeError
from dmerge.io.model_source import ModelSource, open_model
from dmerge.io.safetensors_format import DTYPE_NAMES, FLOAT_CODES, TORCH_NAME, TensorEntry, build_header, itemsize
from dmerge.methods import MergeMethod, get_method
from dmerge.recipe import OutputSlice, Recipe, SliceSource, resolve_param
from dmerge.units import format_bytes

DEFAULT_CHUNK_BYTES = 128 << 20
DEFAULT_SHARD_BYTES = 5_000_000_000
COMPUTE_ITEMSIZE = {"float64": 8, "float32": 4}


@dataclass(frozen=True)
class SourceTensor:
    """One parent tensor feeding an output tensor."""

    model: str  # recipe reference
    file: str  # local path or URL
    entry: TensorEntry

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class TensorPlan:
    """One output tensor: inputs, method + resolved parameters, chunks, destination."""

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

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

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
        return sum(s.entry.nbytes for s in self.sources)


@dataclass
class ShardPlan:
    name: str  # final file name
    header: bytes = field(repr=False)
    size: int
    tensors: list[int]  # indices into Plan.tensors


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

    @property
    def n_tasks(self) -> int:
        from dmerge.tasks import context_of

        def n_stats(t: TensorPlan) -> int:
            method = get_method(t.method)
            return len(method.statistics_for(context_of(t))) if method.statistics and not t.copy_bytes else 0

        return sum(t.n_chunks * (1 + n_stats(t)) if t.n_chunks > 1 else 1 for t in self.tensors)

    @property
    def bytes_read(self) -> int:
        return sum(t.bytes_read for t in self.tensors)

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def peak_task_bytes(self) -> int:
        return max((t.task_bytes for t in self.tensors), default=0)

    def summary(self) -> str:
        """What `dmerge plan` prints: counts, bytes and memory, and the output shards."""
        lines = [
            f"method:            {self.method}",
            f"parents:           {len(self.models)} ({', '.join(self.models)})",
            f"output tensors:    {len(self.tensors)}",
            f"tasks:             {self.n_tasks} (chunk budget {format_bytes(self.chunk_bytes)}, compute {self.compute_dtype})",
            f"bytes to read:     {format_bytes(self.bytes_read)} ({self.bytes_read} B)",
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


def open_models(recipe: Recipe) -> dict[str, ModelSource]:
    """Open every parent named by the recipe (metadata only), concurrently."""
    refs = recipe.referenced_models()
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(refs)))) as pool:
        models = list(pool.map(lambda r: open_model(r, recipe.source_dir), refs))
    return dict(zip(refs, models))


def _layout(model: ModelSource, cache: dict) -> ModelLayout:
    if model.reference not in cache:
        cache[model.reference] = layout_of(list(model.tensors), model.reference, model.num_layers)
    return cache[model.reference]


def normalized_slices(recipe: Recipe, models: dict[str, ModelSource], layouts: dict) -> list[OutputSlice]:
    """``models:`` recipes become one slice over all layers (base appended if missing)."""
    if recipe.slices:
        return recipe.slices
    sources = []
    names = [m.model for m in recipe.models]
    entries = list(recipe.models)
    if recipe.base_model and recipe.base_model not in names:
        from dmerge.recipe import ModelEntry

        entries.append(ModelEntry(model=recipe.base_model))
    for e in entries:
        n = _layout(models[e.model], layouts).num_layers
        sources.append(SliceSource(model=e.model, layer_range=(0, n), parameters=e.parameters))
    return [OutputSlice(sources=sources)]


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
) -> Plan:
    """Plan a merge from the recipe and the parents' headers (no tensor data is read)."""
    method = get_method(recipe.merge_method)
    models = models if models is not None else open_models(recipe)
    layouts: dict[str, ModelLayout] = {}
    slices = normalized_slices(recipe, models, layouts)
    out_dtype = _dtype_code(recipe.out_dtype) or _dtype_code(recipe.dtype)
    compute_itemsize = COMPUTE_ITEMSIZE[compute_dtype]

    tensors: list[TensorPlan] = []
    seen_names: set[str] = set()

    def plan_tensor(out_name: str, sources: list[tuple[_Source, str]], out_slice: OutputSlice, t: float) -> None:
        base_ref = out_slice.base_model or recipe.base_model
        src_tensors = []
        for src, in_name in sources:
            loc = src.model.tensor(in_name)
            src_tensors.append(SourceTensor(src.model.reference, loc.file, loc.entry))
        first = src_tensors[0].entry
        for s in src_tensors[1:]:
            if s.entry.shape != first.shape:
                raise InputModelError(
                    f"tensor {out_name}: shape mismatch: {src_tensors[0].model} has {list(first.shape)}, "
                    f"{s.model} has {list(s.entry.shape)}"
                )
        for s in src_tensors:
            if s.entry.dtype not in FLOAT_CODES and not method.copies_bytes:
                raise InputModelError(
                    f"tensor {s.name} of {s.model} has dtype {s.entry.dtype}; {method.name} needs floating-point tensors"
                )
        base_index = None
        if base_ref is not None:
            matches = [i for i, (src, _) in enumerate(sources) if src.spec.model == base_ref]
            base_index = matches[0] if matches else None
        if method.requires_base and base_index is None:
            raise RecipeError(f"tensor {out_name}: base_model {base_ref} is not among the sources of its slice")

        shared_scopes = [out_slice.parameters, recipe.parameters]
        params = {p.name: resolve_param(p, shared_scopes, out_name, t) for p in method.params}
        model_params = []
        for i, (src, in_name) in enumerate(sources):
            scopes = [src.spec.parameters, out_slice.parameters, recipe.parameters]
            mp = {}
            for p in method.model_params:
                if i == base_index and not p.for_base:
                    mp[p.name] = None
                else:
                    mp[p.name] = resolve_param(p, scopes, in_name, t)
            model_params.append(mp)
        if method.check is not None:
            problem = method.check(params, model_params)
            if problem:
                raise RecipeError(f"tensor {out_name}: {problem}")

        dtype = out_dtype or first.dtype
        if first.dtype not in FLOAT_CODES:
            dtype = first.dtype  # integer buffers are copied as they are
        copy = method.copies_bytes and dtype == first.dtype and all(
            (mp.get("scale") is None) for mp in model_params
        )
        numel_row = math.prod(first.shape[1:]) if len(first.shape) > 1 else (1 if first.shape else 1)
        rows = first.shape[0] if first.shape else 1
        out_item = itemsize(dtype)
        if copy:
            per_row = numel_row * out_item
        else:
            in_items = sum(itemsize(s.entry.dtype) for s in src_tensors)
            converted = 0 if method.raw_inputs else len(src_tensors)  # raw_inputs: converted per block
            per_row = numel_row * (in_items + (converted + method.work_tensors) * compute_itemsize + out_item)
        if len(first.shape) < 2:  # vectors are small: one task each
            rows_per_chunk = rows
        else:
            rows_per_chunk = max(1, min(rows, chunk_bytes // max(1, per_row)))
        if out_name in seen_names:
            raise RecipeError(f"output tensor {out_name} would be written twice")
        seen_names.add(out_name)
        tensors.append(
            TensorPlan(
                name=out_name,
                shape=first.shape,
                dtype=dtype,
                method=method.name,
                sources=src_tensors,
                base_index=base_index,
                params=params,
                model_params=model_params,
                rows_per_chunk=rows_per_chunk,
                copy_bytes=copy,
                task_bytes=per_row * rows_per_chunk,
            )
        )

    resolved_slices = []
    for s in slices:
        srcs = []
        for spec in s.sources:
            if spec.model not in models:
                raise RecipeError(f"model {spec.model} is not known")
            m = models[spec.model]
            lay = _layout(m, layouts)
            if spec.layer_range[1] > lay.num_layers:
                raise RecipeError(
                    f"layer_range {list(spec.layer_range)} of {spec.model} is out of range: it has {lay.num_layers} layers"
                )
            srcs.append(_Source(spec, m, lay))
        resolved_slices.append((s, srcs))

    # pre weights (embeddings) from the first slice's sources, at t = 0
    first_slice, first_srcs = resolved_slices[0]
    for name in first_srcs[0].layout.pre:
        plan_tensor(name, [(src, name) for src in first_srcs], first_slice, 0.0)

    out_layer = 0
    for out_slice, srcs in resolved_slices:
        n = srcs[0].spec.layer_range[1] - srcs[0].spec.layer_range[0]
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            lead = srcs[0]
            lead_names: list[LayerName] = lead.layout.layers.get(lead.spec.layer_range[0] + i, [])
            for ln in lead_names:
                inputs = []
                for src in srcs:
                    idx = src.spec.layer_range[0] + i
                    inputs.append((src, f"{_prefix_of(src.layout, idx, ln)}.{idx}.{ln.suffix}"))
                plan_tensor(ln.renumbered(out_layer), inputs, out_slice, t)
            out_layer += 1

    last_slice, last_srcs = resolved_slices[-1]
    for name in last_srcs[0].layout.post:
        plan_tensor(name, [(src, name) for src in last_srcs], last_slice, 0.0)

    if not tensors:
        raise InputModelError("the recipe selects no tensors")

    shards = _assign_shards(tensors, shard_bytes)
    out_config = _output_config(recipe, models, slices, out_layer, tensors)
    return Plan(
        recipe=recipe,
        method=method.name,
        models=models,
        tensors=tensors,
        shards=shards,
        out_config=out_config,
        chunk_bytes=chunk_bytes,
        compute_dtype=compute_dtype,
        seed=seed,
        allow_nan=allow_nan,
        device=device,
    )


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


def _output_config(recipe: Recipe, models: dict[str, ModelSource], slices, n_layers: int, tensors) -> dict:
    """config.json of the output: the base (or first) model's, with dtype and depth updated."""
    ref = recipe.base_model or slices[0].sources[0].model
    cfg = dict(models[ref].config)
    float_dtypes = [t.dtype for t in tensors if t.dtype in TORCH_NAME]
    if float_dtypes:
        name = TORCH_NAME[max(set(float_dtypes), key=float_dtypes.count)]
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
    if n_layers:
        target = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(target.get(key), int):
                target[key] = n_layers
                break
    return cfg
