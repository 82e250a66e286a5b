"""The recipe: mergekit's YAML schema, parsed, validated and resolved.

Validation happens before any tensor is read and names the key, the bad value and the
YAML line: ``models[1].parameters.density (line 9): must be in [0, 1], got 1.5``.

Parameter values follow mergekit's meaning:

* a scalar applies everywhere;
* a list of numbers is a *gradient*, interpolated linearly over layer depth ``t`` in
  [0, 1] (``t = i / (n - 1)`` for the i-th of n layers of a slice);
* a list of ``{filter, value}`` entries picks the first entry whose ``filter`` is a
  substring of the tensor name (``filter`` absent or ``"*"`` matches everything).
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from dmerge.errors import RecipeError, RecipeWarning
from dmerge.io.safetensors_format import DTYPE_NAMES
from dmerge.methods import MergeMethod, Param, available_methods, get_method

Scalar = Union[bool, int, float, str]

# Recipe attributes that are not part of the YAML schema (never written back out).
INTERNAL_FIELDS = ("source_dir", "source_text", "allow_crimes")


class ConditionalValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: Any = None


ParameterSetting = Any  # scalar | list[scalar] | ConditionalValue | list[ConditionalValue]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[dict[str, ParameterSetting]] = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, ParameterSetting]] = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v):
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"must be [start, end) with 0 <= start <= end, got {list(v)}")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Optional[dict[str, ParameterSetting]] = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must list at least one source")
        return v


class TokenSource(BaseModel):
    """Where one token's embedding row comes from (``tokenizer.tokens.<token>``).

    ``source`` is a model reference (that model's row for the token), ``{kind: zero}``,
    or ``{kind: model_token, model: M, token: T}`` / ``token_id: I`` (a given row of M);
    ``force`` uses it even for parents that have the token.
    """

    model_config = ConfigDict(extra="forbid")
    source: Any = None
    force: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, v):
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, dict) or v.get("kind") not in ("zero", "model_token"):
            raise ValueError("must be a model, {kind: zero} or {kind: model_token, model: ..., token: ...}")
        if v["kind"] == "zero":
            if set(v) != {"kind"}:
                raise ValueError("{kind: zero} takes no other keys")
            return v
        unknown = set(v) - {"kind", "model", "token", "token_id"}
        if unknown:
            raise ValueError(f"model_token entries take model and token or token_id, got {sorted(unknown)}")
        if not isinstance(v.get("model"), str):
            raise ValueError("model_token entries need a model")
        if (v.get("token") is None) == (v.get("token_id") is None):
            raise ValueError("model_token entries need exactly one of token or token_id")
        if v.get("token_id") is not None and (not isinstance(v["token_id"], int) or v["token_id"] < 0):
            raise ValueError(f"token_id must be a non-negative integer, got {v['token_id']!r}")
        return v


class TokenizerSpec(BaseModel):
    """The ``tokenizer:`` block; ``source`` defaults to ``union`` as in mergekit."""

    model_config = ConfigDict(extra="forbid")
    source: Optional[str] = "union"
    tokens: Optional[dict[str, TokenSource]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v


class Recipe(BaseModel):
    """A merge recipe (mergekit's ``MergeConfiguration`` schema)."""

    model_config = ConfigDict(extra="allow")

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, Any]] = None
    parameters: Optional[dict[str, ParameterSetting]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None

    # Not part of the schema: where the recipe came from (relative model paths), and
    # whether mixing architectures was allowed on the command line (--allow-crimes).
    source_dir: Optional[str] = None
    source_text: Optional[str] = None
    allow_crimes: bool = False

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, in first-mention order."""
        seen: list[str] = []
        for m in [self.base_model] + [e.model for e in self.models or []] + [
            src.model for s in self.slices or [] for src in s.sources
        ] + [s.base_model for s in self.slices or []]:
            if m and m not in seen:
                seen.append(m)
        return seen

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)


# ---------------------------------------------------------------------------------------
# Loading with YAML line numbers


def _line_of(root: yaml.Node | None, path: tuple) -> int | None:
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == key:
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
        if node is None:
            break
    return line


def format_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "recipe"


class _Located:
    """Formats errors and warnings as ``path (line N): message``."""

    def __init__(self, node):
        self.node = node

    def where(self, path: tuple) -> str:
        line = _line_of(self.node, path)
        return format_path(path) + (f" (line {line})" if line else "")

    def error(self, path: tuple, message: str) -> RecipeError:
        return RecipeError(f"{self.where(path)}: {message}")

    def warn(self, path: tuple, message: str) -> None:
        warnings.warn(f"{self.where(path)}: {message}", RecipeWarning, stacklevel=3)


def _did_you_mean(name: str, candidates, cutoff: float = 0.6) -> str:
    """``; did you mean 'x'?`` for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


# The keys of a recipe's top level, and of each nested mapping (by its path, list indices
# and token names dropped), for suggestions when a key is misspelled.
RECIPE_KEYS = tuple(k for k in Recipe.model_fields if k not in INTERNAL_FIELDS)
_NESTED_KEYS = {
    ("models",): ModelEntry.model_fields,
    ("slices",): OutputSlice.model_fields,
    ("slices", "sources"): SliceSource.model_fields,
    ("tokenizer",): TokenizerSpec.model_fields,
    ("tokenizer", "tokens"): TokenSource.model_fields,
}
# How close an unknown top-level key must be to a schema key to be taken for a typo (an
# error) rather than an extra key (ignored, as mergekit ignores it): merge_methd, dtpye
# and model are typos; model_name or description are extras.
_TYPO_CUTOFF = 0.8


def _unknown_recipe_keys(keys, loc: _Located) -> list[str]:
    """The top-level keys outside the schema; raises for one that looks like a misspelled key."""
    unknown = [k for k in keys if k not in RECIPE_KEYS and k not in INTERNAL_FIELDS]
    for key in unknown:
        hint = _did_you_mean(str(key), RECIPE_KEYS, _TYPO_CUTOFF)
        if hint:
            raise loc.error((key,), f"is not a recipe key{hint}")
    return unknown


def read_recipe_text(path_or_text: str, is_text: bool = False) -> tuple[str, str]:
    """A recipe's YAML text and the folder its relative paths start from (the file's,
    or the working folder for text given with ``is_text``)."""
    if is_text:
        return path_or_text, os.getcwd()
    try:
        with open(path_or_text, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path_or_text}: {e.strerror}") from None
    return text, os.path.dirname(os.path.abspath(path_or_text))


def load_recipe(path_or_text: str, *, is_text: bool = False, allow_crimes: bool = False) -> Recipe:
    """Parse and validate a recipe from a file path (or YAML text with ``is_text``)."""
    text, source_dir = read_recipe_text(path_or_text, is_text)
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe is not valid YAML: {e}".replace("\n", " ")) from None
    loc = _Located(node)
    if not isinstance(data, dict):
        raise RecipeError("recipe must be a YAML mapping with at least merge_method and models or slices")
    if data.get("merge_method") == "moe" or ("merge_method" not in data and "experts" in data):
        # a FrankenMoE (mergekit-moe's keys; its own files have no merge_method)
        from dmerge.moe.recipe import parse_moe_recipe

        return parse_moe_recipe(data, text=text, source_dir=source_dir, allow_crimes=allow_crimes)
    _unknown_recipe_keys(data, loc)  # a misspelled key first: it explains a missing one
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        # An unknown key is reported before a missing one (a misspelling explains both).
        err = min(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        path = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[", "tuple["))))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            scope = tuple(p for p in path[:-1] if isinstance(p, str))
            scope = scope[:2] if scope[:2] == ("tokenizer", "tokens") else scope  # drop the token
            msg = "is not a known key here" + _did_you_mean(str(path[-1]), _NESTED_KEYS.get(scope, ()))
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{msg}, got {err['input']!r}"
        raise loc.error(path, msg) from None
    recipe.source_dir = source_dir
    recipe.source_text = text
    recipe.allow_crimes = allow_crimes
    validate_recipe(recipe, loc, allow_crimes=allow_crimes)
    return recipe


def validate_recipe(recipe: Recipe, loc: _Located | None = None, *, allow_crimes: bool = False) -> None:
    """Structural and parameter checks (raise RecipeError with the offending key)."""
    loc = loc or _Located(None)
    if recipe.merge_method not in available_methods():
        hint = _did_you_mean(recipe.merge_method, available_methods()) or f" (known: {', '.join(available_methods())})"
        raise loc.error(("merge_method",), f"unknown method {recipe.merge_method!r}{hint}")
    method = get_method(recipe.merge_method)
    for key in _unknown_recipe_keys(recipe.model_extra or {}, loc):
        loc.warn((key,), "is not a recipe key; ignored (as mergekit ignores it)")
    if recipe.modules:
        raise loc.error(("modules",), "multi-module recipes are not supported yet; use models or slices")
    if bool(recipe.models) == bool(recipe.slices):
        raise loc.error((), "exactly one of 'models' or 'slices' must be given")
    if recipe.tokenizer_source and recipe.tokenizer:
        raise loc.error(("tokenizer",), "cannot be given together with tokenizer_source")
    for key in ("dtype", "out_dtype"):
        v = getattr(recipe, key)
        if v is not None and v not in DTYPE_NAMES:
            raise loc.error((key,), f"must be one of float32, float16, bfloat16, float64, got {v!r}")
    if method.requires_base:
        # one-source slices are copied and need no base (see dmerge/plan.py)
        merged = [s for s in recipe.slices or [] if len(s.sources) > 1]
        needs_base = bool(recipe.models) or bool(merged)
        if needs_base and not recipe.base_model and not (merged and all(s.base_model for s in merged)):
            raise loc.error(("base_model",), f"is required by merge_method {method.name}")
    if recipe.slices:
        for i, s in enumerate(recipe.slices):
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) > 1:
                raise loc.error(("slices", i, "sources"), f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
            if method.single_source and len(s.sources) > 1:
                raise loc.error(("slices", i, "sources"), f"{method.name} takes exactly one source per slice, got {len(s.sources)}")
    elif method.single_source and len(recipe.models) + (1 if recipe.base_model and recipe.base_model not in [m.model for m in recipe.models] else 0) > 1:
        raise loc.error(("models",), f"{method.name} takes exactly one model")

    # Every parameter value, wherever it appears, is checked against the method's spec.
    scopes: list[tuple[tuple, dict | None, bool]] = [(("parameters",), recipe.parameters, False)]
    for i, m in enumerate(recipe.models or []):
        scopes.append((("models", i, "parameters"), m.parameters, True))
    for i, s in enumerate(recipe.slices or []):
        scopes.append((("slices", i, "parameters"), s.parameters, False))
        for j, src in enumerate(s.sources):
            scopes.append((("slices", i, "sources", j, "parameters"), src.parameters, True))
    # A single-source slice of a method that needs a base is copied (see plan.py); it takes
    # passthrough's parameters (scale) as well.
    copy_method = get_method("passthrough")
    copy_scopes = set()
    if method.requires_base:
        for i, s in enumerate(recipe.slices or []):
            if len(s.sources) == 1:
                copy_scopes.add(("slices", i, "parameters"))
                copy_scopes.add(("slices", i, "sources", 0, "parameters"))
    for path, params, _model_level in scopes:
        for name, setting in (params or {}).items():
            spec = method.param(name)
            if spec is None and path in copy_scopes:
                spec = copy_method.param(name)
            if spec is None:
                _unknown_parameter(method, name, path, loc, copy=path in copy_scopes)
                continue
            for sub, value in _leaves(setting):
                try:
                    spec.coerce(value)
                except ValueError as e:
                    raise loc.error(path + (name,) + sub, str(e)) from None


def _unknown_parameter(method: MergeMethod, name: str, path: tuple, loc: _Located, copy: bool) -> None:
    """A parameter ``method`` does not read: ignored with a warning when some other method
    reads it (left over from another recipe), an error when no method does (misspelled)."""
    if any(get_method(m).param(name) for m in available_methods()):
        loc.warn(path + (name,), f"{method.name} ignores {name!r}")
        return
    own = [p.name for p in method.params + method.model_params]
    if copy:
        passthrough = get_method("passthrough")
        own += [p.name for p in passthrough.params + passthrough.model_params if p.name not in own]
    hint = _did_you_mean(name, own) or (f"; it takes {', '.join(own)}" if own else "; it takes none")
    raise loc.error(path + (name,), f"{method.name} has no parameter {name!r}{hint}")


def _leaves(setting: Any, sub: tuple = ()):
    """Every scalar in a parameter setting, with its sub-path (for error messages)."""
    if isinstance(setting, dict):
        unknown = set(setting) - {"filter", "value"}
        if unknown:
            raise RecipeError(f"conditional parameter entries take 'filter' and 'value', got {sorted(unknown)}")
        yield from _leaves(setting.get("value"), sub + ("value",))
    elif isinstance(setting, list):
        if not setting:
            raise RecipeError("empty list is not a valid parameter value")
        for i, v in enumerate(setting):
            yield from _leaves(v, sub + (i,))
    else:
        yield sub, setting


# ---------------------------------------------------------------------------------------
# Resolving a parameter for one tensor


def evaluate_setting(setting: Any, tensor_name: str, t: float, param: Param) -> Any:
    """Resolve one setting (scalar / gradient / filtered list) for a tensor at depth ``t``.

    Returns None when no filter matches (the caller then looks at the next scope).
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return param.coerce(setting)
    if all(not isinstance(e, (dict, list)) for e in setting):
        values = [param.coerce(e) for e in setting]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric or len(values) == 1:
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        return param.coerce((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, dict):
            raise RecipeError(f"parameter {param.name}: cannot mix plain values and filter entries in one list")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(cond.get("value"), tensor_name, t, param)
    return None


def resolve_param(param: Param, scopes: list[dict | None], tensor_name: str, t: float) -> Any:
    """First non-None value of ``param`` across scopes (highest precedence first), or its default."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param)
            if value is not None:
                return value
    if param.required:
        raise RecipeError(f"missing required parameter {param.name!r} for tensor {tensor_name}")
    return param.default
