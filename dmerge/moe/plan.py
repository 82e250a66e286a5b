"""The MoE layout planner: beside the merge planner (:class:`dmerge.plan.MergePlanner`),
from the same steps (:func:`dmerge.plan.open_context`, :func:`source_tensors`,
:func:`task_memory`, :func:`assemble_plan`).

Output tensors, in the base's order: embeddings, then per layer the base's attention and
norms, and in place of its MLP the MoE block (router, every expert's three projections,
the shared expert and its gate), then the final norm and head. Expert and base tensors
are byte copies (cast where the recipe's dtype differs, scaled or noised where an
expert asks); the routers are computed tensors (:class:`dmerge.plan.ComputedSource`)
of one :class:`dmerge.moe.hidden.RouterPass`.
"""

from __future__ import annotations

import warnings

from dmerge.errors import InputModelError, RecipeError, RecipeWarning
from dmerge.io.safetensors_format import DTYPE_NAMES, FLOAT_CODES, TORCH_NAME
from dmerge.methods import get_method
from dmerge.moe import families
from dmerge.moe.hidden import Location, Prompts, RouterPass
from dmerge.moe.recipe import MoERecipe
from dmerge.plan import (DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, ComputedSource, LayerOrigin, Plan, PlanContext,
                         TensorPlan, assemble_plan, is_byte_copy, open_context, source_tensors, task_memory)

MLP_PREFIX = "mlp."


class MoEPlanner:
    """Plans the output tensors of a FrankenMoE (see the module docstring)."""

    def __init__(self, ctx: PlanContext, recipe: MoERecipe):
        self.ctx = ctx
        self.recipe = recipe
        self.base = ctx.models[recipe.base_model]
        self.base_layout = ctx.layout(recipe.base_model)
        self.experts = [ctx.models[e.source_model] for e in recipe.experts]
        self.shared = [ctx.models[e.source_model] for e in recipe.shared_experts or []]
        self.model_type = str(self.base.config.get("model_type", ""))
        self.check_experts()
        self.family = families.choose_family(recipe.architecture, self.model_type, len(self.shared))
        self.packed = recipe.expert_layout == "packed"
        self.dtype = self.output_dtype()
        self.tensors: list[TensorPlan] = []

    # -- checks ------------------------------------------------------------------------

    def check_experts(self) -> None:
        """Every expert must be the base's architecture, with its depth and shapes."""
        base_lay = self.base_layout
        base_type = self.model_type
        n = base_lay.num_layers
        hidden = self.base.config.get("hidden_size")
        for kind, specs, models in (("experts", self.recipe.experts, self.experts),
                                    ("shared_experts", self.recipe.shared_experts or [], self.shared)):
            for i, (spec, m) in enumerate(zip(specs, models)):
                where = f"{kind}[{i}] ({spec.source_model})"
                t = str(m.config.get("model_type", ""))
                if t != base_type:
                    raise InputModelError(f"{where} is a {t or 'unknown'} model, the base is {base_type}: a MoE takes "
                                          "experts of the base's architecture")
                lay = self.ctx.layout(spec.source_model)
                if lay.num_layers != n:
                    raise InputModelError(f"{where} has {lay.num_layers} layers, the base has {n}")
                if m.config.get("hidden_size") != hidden:
                    raise InputModelError(f"{where} has hidden size {m.config.get('hidden_size')}, the base has {hidden}")
                for layer in range(n):
                    for proj in families.PROJECTIONS:
                        name = f"{base_lay.layer_prefix}.{layer}.{MLP_PREFIX}{proj}.weight"
                        want = self.base.tensor(name).entry.shape
                        got = m.tensor(name).entry.shape
                        if got != want:
                            raise InputModelError(f"{where}: {name} has shape {list(got)}, the base's is "
                                                  f"{list(want)}; every expert must have the base's shapes")
        if not any(ln.suffix.startswith(MLP_PREFIX) for ln in base_lay.layers.get(0, [])):
            raise InputModelError(f"base model {self.recipe.base_model} has no dense MLP (mlp.*) in its layers")

    def output_dtype(self) -> str:
        """The recipe's dtype, else the base's (mergekit-moe's rule)."""
        if self.recipe.dtype:
            return DTYPE_NAMES[self.recipe.dtype]
        name = self.base.config.get("torch_dtype") or self.base.config.get("dtype")
        if isinstance(name, str) and name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        return self.base.tensor(self.base_layout.embedding).entry.dtype

    # -- tensors -----------------------------------------------------------------------

    def copy(self, out_name: str, model, in_name: str, *, scale: float | None = None,
             noise: float | None = None) -> None:
        """An output tensor that is a parent tensor (cast to the output dtype; noised or
        scaled for an expert that asks)."""
        self.tensors.append(self.copy_plan(out_name, model, in_name, scale=scale, noise=noise))

    def copy_plan(self, out_name: str, model, in_name: str, *, scale: float | None = None,
                  noise: float | None = None) -> TensorPlan:
        """The plan of :meth:`copy`'s tensor, not yet added."""
        src = source_tensors([(model, in_name)])
        if noise:
            m, mp = get_method("moe_expert"), [{"noise_scale": noise, "scale": scale}]
        else:
            m, mp = get_method("passthrough"), [{"scale": scale}]
        dtype = src[0].entry.dtype if src[0].entry.dtype not in FLOAT_CODES else self.dtype
        if dtype != src[0].entry.dtype and src[0].entry.dtype not in FLOAT_CODES:
            raise InputModelError(f"tensor {in_name} of {model.reference} is {src[0].entry.dtype}")
        byte_copy = is_byte_copy(m, src, dtype, mp)
        shape = tuple(src[0].entry.shape)
        per_row, rows = task_memory(shape, dtype, src, m, copy=byte_copy, row_mapped=False,
                                    compute_itemsize=self.ctx.compute_itemsize, chunk_bytes=self.ctx.chunk_bytes)
        return TensorPlan(name=out_name, shape=shape, dtype=dtype, method=m.name, sources=src, base_index=None,
                          params={}, model_params=mp, rows_per_chunk=rows, copy_bytes=byte_copy,
                          task_bytes=per_row * rows)

    def stacked(self, out_name: str, parts: list[TensorPlan], shape: tuple[int, ...]) -> None:
        """A stacked ``[experts, out, in]`` tensor made of ``parts`` (each expert's
        projection, in row order), chunked by rows of its flattened leading dimensions
        so that a task stays within the budget however large one expert is."""
        pieces, row = [], 0
        for p in parts:
            pieces.append((row, p))
            row += p.rows
        flat = (row,) + tuple(shape[2:])
        per_row = max(p.task_bytes // max(1, p.rows_per_chunk) for p in parts)
        rows = flat[0] if len(flat) < 2 else max(1, min(flat[0], self.ctx.chunk_bytes // max(1, per_row)))
        methods = {p.method for p in parts}
        self.tensors.append(TensorPlan(
            name=out_name, shape=shape, dtype=parts[0].dtype,
            method="moe_expert" if "moe_expert" in methods else "passthrough",
            sources=[s for p in parts for s in p.sources], base_index=None, params={}, model_params=[],
            rows_per_chunk=rows, copy_bytes=all(p.copy_bytes for p in parts), task_bytes=per_row * rows,
            row_ndim=2, pieces=tuple(pieces)))

    def computed(self, out_name: str, rows: int, part: str) -> None:
        """A router: ``rows`` x hidden values computed by the plan's router pass."""
        shape = (rows, int(self.base.config["hidden_size"]))
        self.tensors.append(TensorPlan(name=out_name, shape=shape, dtype=self.dtype, method="computed", sources=[],
                                       base_index=None, params={}, model_params=[], rows_per_chunk=rows,
                                       copy_bytes=False, task_bytes=rows * shape[1] * 12,
                                       computed=ComputedSource(0, part)))

    def plan_moe_block(self, layer: int) -> None:
        """Layer ``layer``'s MoE block: router, experts, shared expert and its gate."""
        fam = self.family
        prefix = f"{self.base_layout.layer_prefix}.{layer}.{MLP_PREFIX}"
        self.computed(fam.router_tensor(layer, self.packed), len(self.experts), f"router:{layer}")
        if self.packed:
            self.plan_packed_experts(layer, prefix)
        for e, (spec, model) in enumerate(zip(self.recipe.experts, self.experts) if not self.packed else []):
            for proj in families.PROJECTIONS:
                scale = spec.residual_scale if proj == "down_proj" else None
                self.copy(fam.expert_tensor(layer, e, proj), model, f"{prefix}{proj}.weight", scale=scale,
                          noise=spec.noise_scale)
        for spec, model in zip(self.recipe.shared_experts or [], self.shared):
            for proj in families.PROJECTIONS:
                scale = spec.residual_scale if proj == "down_proj" else None
                self.copy(fam.shared_tensor(layer, proj), model, f"{prefix}{proj}.weight", scale=scale,
                          noise=spec.noise_scale)
            self.computed(fam.shared_gate_tensor(layer), 1, f"shared:{layer}")

    def plan_packed_experts(self, layer: int, prefix: str) -> None:
        """transformers 5's fused expert tensors: ``gate_up_proj`` [E, 2I, H] (each
        expert's gate rows, then its up rows) and ``down_proj`` [E, H, I]. Each part is
        planned as the per-expert tensor it would be (same noise and scale, so both
        layouts hold the same values)."""
        fam = self.family
        gate_up, down = [], []
        for e, (spec, model) in enumerate(zip(self.recipe.experts, self.experts)):
            for proj, into in (("gate_proj", gate_up), ("up_proj", gate_up), ("down_proj", down)):
                scale = spec.residual_scale if proj == "down_proj" else None
                into.append(self.copy_plan(fam.expert_tensor(layer, e, proj), model, f"{prefix}{proj}.weight",
                                           scale=scale, noise=spec.noise_scale))
        n = len(self.experts)
        g = gate_up[0].shape
        self.stacked(fam.packed_tensor(layer, "gate_up_proj"), gate_up, (n, 2 * g[0], g[1]))
        self.stacked(fam.packed_tensor(layer, "down_proj"), down, (n,) + tuple(down[0].shape))

    def plan_all(self) -> list[TensorPlan]:
        """Every output tensor, in the base's order (see the module docstring)."""
        lay = self.base_layout
        for name in lay.pre:
            self.copy(name, self.base, name)
        for layer in range(lay.num_layers):
            block_done = False
            for ln in lay.layers[layer]:
                if ln.suffix.startswith(MLP_PREFIX):
                    if not block_done:
                        self.plan_moe_block(layer)
                        block_done = True
                    continue
                self.copy(ln.name, self.base, ln.name)
        for name in lay.post:
            self.copy(name, self.base, name)
        return self.tensors

    # -- the router pass -----------------------------------------------------------------

    def router_pass(self, seed: int, trust_remote_code: bool) -> RouterPass:
        """The computation of the routers: the base's embedding and layers by location, the prompts tokenized."""
        lay = self.base_layout
        layers = []
        for layer in range(lay.num_layers):
            locs = {}
            for ln in lay.layers[layer]:
                loc = self.base.tensor(ln.name)
                locs[ln.suffix] = Location(loc.file, loc.entry)
            layers.append(locs)
        emb = self.base.tensor(lay.embedding)
        names = [f"{e}: {spec.source_model}" for e, spec in enumerate(self.recipe.experts)]
        return RouterPass(model_type=self.model_type, config=dict(self.base.config), mode=self.recipe.gate_mode,
                          embedding=Location(emb.file, emb.entry), layers=layers,
                          prompts=tokenize_prompts(self.recipe, self.ctx.models, trust_remote_code),
                          n_routed=len(self.experts), n_shared=len(self.shared),
                          hidden=int(self.base.config["hidden_size"]), seed=seed,
                          chunk_bytes=self.ctx.chunk_bytes, names=names)


def tokenize_prompts(recipe: MoERecipe, models: dict, trust_remote_code: bool = False) -> Prompts:
    """Every prompt once, tokenized as mergekit-moe does: the BOS token's text before each
    prompt, no other special tokens, left padding with BOS as the pad token."""
    from dmerge.tokenizer import load_tokenizer

    ref = recipe.tokenizer_ref
    tok = load_tokenizer(models[ref].location, f"model {ref}", trust_remote_code)
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts: list[str] = []
    index: dict[str, int] = {}

    def ids(prompts) -> tuple[int, ...]:
        out = []
        for p in prompts or []:
            if p not in index:
                index[p] = len(texts)
                texts.append(p)
            out.append(index[p])
        return tuple(out)

    groups = tuple((ids(e.positive_prompts), ids(e.negative_prompts)) for e in recipe.all_experts)
    evals = tuple(ids(e.eval_prompts or e.positive_prompts) for e in recipe.experts)
    if not texts:  # random gates and no prompts: one prompt keeps the pass (and its report) well-formed
        texts.append("")
    enc = tok([(tok.bos_token or "") + t for t in texts], padding=True, add_special_tokens=False)
    if not enc["input_ids"] or not enc["input_ids"][0]:
        raise RecipeError("the prompts are empty once tokenized")
    return Prompts(tuple(tuple(r) for r in enc["input_ids"]), tuple(tuple(r) for r in enc["attention_mask"]),
                   groups, evals)


def build_moe_plan(recipe: MoERecipe, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, compute_dtype: str = "float64", models=None, seed: int = 0,
                   allow_nan: bool = False, device: str = "cpu", allow_crimes: bool | None = None,
                   trust_remote_code: bool = False) -> Plan:
    """Plan a FrankenMoE from its recipe and the parents' headers (and the tokenizer, to
    tokenize the prompts); no tensor data is read."""
    if not isinstance(recipe, MoERecipe):
        raise RecipeError("merge_method moe needs a MoE recipe (base_model, experts)")
    ctx = open_context(recipe, models=models, chunk_bytes=chunk_bytes, compute_dtype=compute_dtype,
                       allow_crimes=True, trust_remote_code=trust_remote_code, with_tokenizer=False)
    planner = MoEPlanner(ctx, recipe)
    tensors = planner.plan_all()
    rp = planner.router_pass(seed, trust_remote_code)
    base_cfg = planner.base.config
    layer0 = planner.base_layout.layers[0]
    qkv_bias = any(ln.suffix == "self_attn.q_proj.bias" for ln in layer0)
    if planner.family is families.MIXTRAL and qkv_bias:
        raise InputModelError("the base has attention biases, which Mixtral has not; use architecture: qwen")
    n_experts = len(planner.experts)
    if len({e.source_model for e in recipe.experts}) == 1 and n_experts > 1:
        warnings.warn(RecipeWarning("every expert is the same model: the MoE computes what that model computes, "
                                    "with more memory (useful only as a start for further training)"), stacklevel=2)
    if n_experts & (n_experts - 1):
        warnings.warn(RecipeWarning(f"the MoE has {n_experts} experts, not a power of two: llama.cpp will not "
                                    "run it"), stacklevel=2)
    out_config = families.output_config(planner.family, base_cfg, n_experts=n_experts,
                                        experts_per_token=recipe.experts_per_token,
                                        dtype=TORCH_NAME.get(planner.dtype, "bfloat16"), qkv_bias=qkv_bias)
    n = planner.base_layout.num_layers
    layers = [LayerOrigin(i, recipe.base_model, i, 0) for i in range(n)]
    ctx.architecture = f"{planner.family.display} ({n_experts} experts from {planner.model_type})"
    return assemble_plan(ctx, "moe", tensors, out_config, shard_bytes=shard_bytes, seed=seed, allow_nan=allow_nan,
                         device=device, layers=layers, trust_remote_code=trust_remote_code, computations=[rp])
