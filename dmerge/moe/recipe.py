"""The MoE recipe: mergekit-moe's schema, validated up front.

    base_model: mistralai/Mistral-7B-v0.1
    gate_mode: hidden            # hidden | cheap_embed | random | uniform_random | router_input
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: teknium/OpenHermes-2.5-Mistral-7B
        positive_prompts: ["chat", "assistant"]
        negative_prompts: ["math"]          # optional
        eval_prompts: ["..."]               # optional, dmerge's: held out for the routing report
        noise_scale: 0.01                   # optional: gaussian noise added to the expert's MLP
        residual_scale: 0.5                 # optional: scales the expert's down projection
    shared_experts: [...]                   # Qwen2-MoE: exactly one, with prompts
    architecture: mixtral                   # optional: mixtral | qwen | qwen3 (prefix of the family)
    tokenizer_source: base                  # optional: the model whose tokenizer reads the prompts

The same keys with ``merge_method: moe`` make an ordinary recipe that ``dmerge run`` takes.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dmerge.errors import RecipeError, RecipeWarning
from dmerge.io.safetensors_format import DTYPE_NAMES
from dmerge.recipe import read_recipe_text

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "router_input")
EXPERT_LAYOUTS = ("per_expert", "packed")


class Expert(BaseModel):
    """One expert: a dense model whose MLPs become the expert's, and prompts for its router rows."""

    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    eval_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


class MoERecipe(BaseModel):
    """A FrankenMoE recipe (mergekit-moe's ``MoEMergeConfig``, plus dmerge's keys)."""

    model_config = ConfigDict(extra="allow")

    merge_method: str = "moe"
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[Any] = None
    expert_layout: str = "per_expert"
    chat_template: Optional[str] = None

    # Not part of the schema (as in Recipe)
    source_dir: Optional[str] = None
    source_text: Optional[str] = None
    allow_crimes: bool = False

    # what the rest of dmerge asks of a recipe
    models: None = None
    slices: None = None
    parameters: None = None
    out_dtype: None = None

    def referenced_models(self) -> list[str]:
        seen: list[str] = []
        for m in [self.base_model] + [e.source_model for e in self.all_experts] + [self.tokenizer_ref]:
            if m and m not in seen:
                seen.append(m)
        return seen

    @property
    def all_experts(self) -> list[Expert]:
        """Routed experts, then shared ones."""
        return list(self.experts) + list(self.shared_experts or [])

    @property
    def tokenizer_ref(self) -> str:
        """The model whose tokenizer reads the prompts (and is copied to the output)."""
        src = self.tokenizer_source or (self.tokenizer if isinstance(self.tokenizer, str) else None)
        return self.base_model if src in (None, "base") else src


INTERNAL_FIELDS = ("source_dir", "source_text", "allow_crimes", "models", "slices", "parameters", "out_dtype")
MOE_KEYS = tuple(k for k in MoERecipe.model_fields if k not in INTERNAL_FIELDS)


def parse_moe_recipe(data: dict, *, text: str, source_dir: str, allow_crimes: bool = False,
                     expert_layout: str | None = None) -> MoERecipe:
    """Validate a parsed MoE recipe; every problem is one RecipeError naming the key."""
    for key in data:
        if key not in MOE_KEYS:
            warnings.warn(RecipeWarning(f"{key}: is not a MoE recipe key; ignored"), stacklevel=2)
    try:
        recipe = MoERecipe.model_validate({k: v for k, v in data.items() if k in MOE_KEYS})
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join(str(p) for p in err["loc"])
        msg = "is required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known key of an expert (source_model, positive_prompts, negative_prompts, " \
                  "eval_prompts, noise_scale, residual_scale)"
        raise RecipeError(f"{path}: {msg}") from None
    recipe.source_dir, recipe.source_text, recipe.allow_crimes = source_dir, text, allow_crimes
    if expert_layout is not None:
        recipe.expert_layout = expert_layout
    validate_moe_recipe(recipe)
    return recipe


def validate_moe_recipe(recipe: MoERecipe) -> None:
    """The checks mergekit-moe makes, as clear errors before any model is opened."""
    if recipe.merge_method != "moe":
        raise RecipeError(f"merge_method: a MoE recipe has merge_method moe, got {recipe.merge_method!r}")
    if recipe.gate_mode not in GATE_MODES:
        raise RecipeError(f"gate_mode: must be one of {', '.join(GATE_MODES)}, got {recipe.gate_mode!r}")
    if recipe.expert_layout not in EXPERT_LAYOUTS:
        raise RecipeError(f"expert_layout: must be one of {', '.join(EXPERT_LAYOUTS)}, got {recipe.expert_layout!r}")
    if recipe.dtype is not None and recipe.dtype not in DTYPE_NAMES:
        raise RecipeError(f"dtype: must be one of float32, float16, bfloat16, float64, got {recipe.dtype!r}")
    if not recipe.experts:
        raise RecipeError("experts: at least one expert is required")
    if recipe.experts_per_token < 1:
        raise RecipeError(f"experts_per_token: must be >= 1, got {recipe.experts_per_token}")
    if len(recipe.experts) < recipe.experts_per_token:
        raise RecipeError(f"experts_per_token: {recipe.experts_per_token} is more than the "
                          f"{len(recipe.experts)} experts given")
    needs_prompts = recipe.gate_mode not in ("random", "uniform_random")
    for kind, experts in (("experts", recipe.experts), ("shared_experts", recipe.shared_experts or [])):
        for i, e in enumerate(experts):
            if needs_prompts and not e.positive_prompts:
                raise RecipeError(f"{kind}[{i}].positive_prompts: gate_mode {recipe.gate_mode} needs at least one "
                                  "positive prompt per expert")
            for key in ("noise_scale", "residual_scale"):
                v = getattr(e, key)
                if v is not None and not (v == v and abs(v) != float("inf")):
                    raise RecipeError(f"{kind}[{i}].{key}: must be a finite number, got {v}")
            if e.noise_scale is not None and e.noise_scale < 0:
                raise RecipeError(f"{kind}[{i}].noise_scale: must be >= 0, got {e.noise_scale}")
    if needs_prompts and len(recipe.experts) > 1:
        def prompts(e: Expert):
            return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())

        if all(prompts(e) == prompts(recipe.experts[0]) for e in recipe.experts[1:]):
            raise RecipeError("experts: every expert has the same positive and negative prompts, so the routers "
                              "cannot tell them apart; give each expert prompts of what it should receive")


def load_moe_recipe(path_or_text: str, *, is_text: bool = False, allow_crimes: bool = False,
                    expert_layout: str | None = None) -> MoERecipe:
    """Read and validate a MoE recipe (a file path, or YAML text with ``is_text``)."""
    text, source_dir = read_recipe_text(path_or_text, is_text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise RecipeError("a MoE recipe must be a YAML mapping with base_model and experts")
    data.setdefault("merge_method", "moe")
    return parse_moe_recipe(data, text=text, source_dir=source_dir, allow_crimes=allow_crimes,
                            expert_layout=expert_layout)
