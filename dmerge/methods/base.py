"""What a merge method is: its parameters, the statistics it needs, and its math.

A method is one decorated function from a :class:`ChunkInputs` (the parent rows of one
chunk, already in the compute dtype, with resolved parameters) to the merged rows::

    @merge_method("linear",
                  model_params=[Param("weight", required=True)],
                  params=[Param("normalize", kind=bool, default=True)])
    def linear(x: ChunkInputs) -> torch.Tensor:
        w = x.model_param("weight")
        ...

Methods that need tensor-wide numbers declare :class:`Statistic` objects: a ``chunk``
function computing a small partial from one chunk, a ``combine`` that merges partials
(associative, so chunks can be reduced in any grouping) and a ``finalize``. The engine
runs them as a Dask reduction across chunk tasks, in declaration order (a later
statistic sees the earlier ones in ``x.stats``), then calls the method on every chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from dmerge.lazy import torch


@dataclass(frozen=True)
class Param:
    """A recipe parameter a method reads.

    ``per_model`` parameters are given per input model (``models[i].parameters``);
    the others are shared (top-level or slice ``parameters``). ``for_base`` says whether
    a per-model parameter also applies to the base model (mergekit's INPUT scope, e.g.
    linear's ``weight``) or only to the others (DELTA scope, e.g. ``density``).
    """

    name: str
    kind: type = float
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    choices: tuple | None = None
    per_model: bool = False
    for_base: bool = True
    doc: str = ""

    def describe(self) -> str:
        """How the parameter is given, for ``dmerge methods``: ``per model, default 1``."""
        where = ("per model" if self.for_base else "per model (not base)") if self.per_model else "shared"
        if self.required:
            need = "required"
        elif self.default is None:
            need = "optional"
        elif isinstance(self.default, bool):
            need = f"default {str(self.default).lower()}"
        else:
            need = f"default {self.default:g}" if isinstance(self.default, (int, float)) else f"default {self.default}"
        return f"{where}, {need}"

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        lo = "(" if self.min_exclusive else "["
        a = "-inf" if self.minimum is None else f"{self.minimum:g}"
        b = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"in {lo}{a}, {b}]"

    def coerce(self, value: Any) -> Any:
        """Check one scalar value; return it in the parameter's type or raise ValueError."""
        if value is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(f"must be true or false, got {value!r}")
        if self.kind in (float, int):
            if isinstance(value, bool):
                raise ValueError(f"must be a number, got {value!r}")
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"must be a number, got {value!r}") from None
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"must be a number, got {value!r}")
            if self.kind is int:
                if float(value) != int(value):
                    raise ValueError(f"must be an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            lo_bad = self.minimum is not None and (
                value <= self.minimum if self.min_exclusive else value < self.minimum
            )
            hi_bad = self.maximum is not None and value > self.maximum
            if lo_bad or hi_bad:
                raise ValueError(f"must be {self.describe_range()}, got {value:g}")
            return value
        if self.kind is str:
            value = str(value)
            if self.choices and value not in self.choices:
                raise ValueError(f"must be {self.describe_range()}, got {value!r}")
            return value
        return value


# In ChunkInputs.scratch: how many of the rows a method returned are NaN or infinite, when
# the fused kernel that wrote them counted them (the engine then does not count again).
NONFINITE_OUTPUTS = "nonfinite_outputs"


@dataclass
class ChunkInputs:
    """The inputs of one method call: rows ``[row_start, row_stop)`` of one tensor.

    ``tensors`` holds one tensor per source model in recipe order (compute dtype);
    ``base_index`` points at the base model's tensor, if the recipe has one. For a method
    declared with ``raw_inputs`` the tensors keep their stored dtype and ``compute_dtype``
    says what to convert them to (the method does so piece by piece).
    The result is in the compute dtype, or already rounded to ``out_dtype`` when given.
    """

    tensor_name: str
    tensors: list[torch.Tensor]
    base_index: int | None
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    full_shape: tuple[int, ...]
    row_start: int = 0
    row_stop: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    compute_dtype: torch.dtype | None = None
    # The output dtype. A method may return its rows already rounded to it (with
    # dmerge.numerics.round_to): block-wise methods do, so no chunk-sized compute-dtype
    # result is ever held. None: return the compute dtype, the engine rounds.
    out_dtype: torch.dtype | None = None
    # What one step of a task leaves for a later step of the same task, on the same rows:
    # the keep-mask bits DARE's rescale statistic drew, which the write pass of a
    # one-chunk tensor then uses instead of drawing them again (see keep_bits_key).
    scratch: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


    @property
    def base(self) -> torch.Tensor:
        if self.base_index is None:
            raise ValueError(f"{self.tensor_name}: this method needs a base_model")
        return self.tensors[self.base_index]

    @property
    def others(self) -> list[torch.Tensor]:
        """Tensors of every source except the base model."""
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]

    @property
    def others_params(self) -> list[dict[str, Any]]:
        return [p for i, p in enumerate(self.model_params) if i != self.base_index]

    def model_param(self, name: str, include_base: bool = True) -> torch.Tensor:
        """A per-model parameter as a tensor of shape ``[n_models, 1, ...]``, ready to broadcast."""
        params = self.model_params if include_base else self.others_params
        ref = self.tensors[0]
        values = torch.tensor([p[name] for p in params], dtype=self.compute_dtype or ref.dtype, device=ref.device)
        return values.reshape((len(params),) + (1,) * ref.dim())

    @property
    def element_offset(self) -> int:
        """Flat index of this chunk's first element in the whole tensor (for keyed RNG)."""
        row = math.prod(self.full_shape[1:]) if len(self.full_shape) > 1 else 1
        return self.row_start * row


@dataclass(frozen=True)
class Statistic:
    """A tensor-wide number, reduced across chunks: chunk -> combine -> finalize.

    ``when`` (optional) decides from a tensor's resolved parameters (a ChunkInputs
    without tensors) whether the statistic is needed at all; a statistic that is not
    needed costs no pass over the data and is absent from ``x.stats``.

    ``reads`` (optional) decides, for one chunk, from a ChunkInputs without tensors but
    with the chunk's rows and the earlier statistics in ``stats``, whether ``chunk``
    needs the chunk's data; when it says no, ``chunk`` is called with no tensors and no
    parent byte is fetched (a second pass that earlier statistics already settled).
    """

    name: str
    chunk: Callable[[ChunkInputs], Any]
    combine: Callable[[list[Any]], Any] = None  # type: ignore[assignment]
    finalize: Callable[[Any, ChunkInputs], Any] = None  # type: ignore[assignment]
    when: Callable[[ChunkInputs], bool] | None = None
    reads: Callable[[ChunkInputs], bool] | None = None

    def reads_data(self, context: ChunkInputs) -> bool:
        """Whether ``chunk`` needs the data of the chunk ``context`` describes."""
        return self.reads is None or bool(self.reads(context))

    def applies(self, context: ChunkInputs) -> bool:
        return self.when is None or bool(self.when(context))

    def combine_all(self, partials: list[Any]) -> Any:
        return (self.combine or _sum_partials)(partials)

    def final(self, combined: Any, context: ChunkInputs) -> Any:
        return combined if self.finalize is None else self.finalize(combined, context)


def context_of(tensor, stats: dict | None = None, row_start: int = 0, row_stop: int | None = None) -> ChunkInputs:
    """A tensor's resolved parameters as a ChunkInputs without data (for finalize, when,
    reads), for rows ``[row_start, row_stop)`` (default: the whole tensor)."""
    return ChunkInputs(
        tensor_name=tensor.name, tensors=[], base_index=tensor.base_index, params=tensor.params,
        model_params=tensor.model_params, full_shape=tensor.shape, row_start=row_start,
        row_stop=tensor.rows if row_stop is None else row_stop, stats=dict(stats or {}),
    )


def _sum_partials(partials: list[Any]) -> Any:
    total = partials[0]
    for p in partials[1:]:
        total = total + p
    return total


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (see :func:`merge_method`)."""

    name: str
    fn: Callable[[ChunkInputs], torch.Tensor]
    params: tuple[Param, ...] = ()
    model_params: tuple[Param, ...] = ()
    requires_base: bool = False
    statistics: tuple[Statistic, ...] = ()
    # How many compute-dtype temporaries per element the method holds beyond its inputs;
    # used to size chunks against the per-task memory budget.
    work_tensors: int = 2
    # A byte-copying method (passthrough) may skip decoding when it does no arithmetic.
    copies_bytes: bool = False
    single_source: bool = False
    # The method converts its inputs to the compute dtype itself (e.g. per row block,
    # which avoids whole-chunk float64 copies); it gets them as stored.
    raw_inputs: bool = False
    # Each output element depends only on the same element of the inputs (and the
    # parameters): the engine then runs the method on cache-sized flat blocks, widening
    # and rounding block by block, so float64 temporaries never leave the CPU cache.
    elementwise: bool = False
    # Optional plan-time check of one tensor's resolved parameters: (params, model_params)
    # -> error message or None. Lets a method refuse e.g. weights summing to zero up front.
    check: Callable[[dict, list[dict]], str | None] | None = None
    reference: str = ""
    doc: str = ""

    def statistics_for(self, context: ChunkInputs) -> list[tuple[int, Statistic]]:
        """(index, statistic) of the statistics one tensor needs, in declaration order."""
        return [(i, s) for i, s in enumerate(self.statistics) if s.applies(context)]

    @property
    def summary(self) -> str:
        """The first line of the method's description."""
        return self.doc.splitlines()[0].strip().replace("``", "") if self.doc else ""

    def describe(self) -> list[str]:
        """What ``dmerge methods`` prints: the method and its one-line description, then
        one line per parameter (how it is given, its default, what it does)."""
        head = self.name + (" (needs base_model)" if self.requires_base else "")
        lines = [f"{head}: {self.summary}" if self.summary else head]
        for p in self.params + self.model_params:
            lines.append(f"    {p.name:<18} {p.describe():<36} {p.doc}".rstrip())
        return lines

    def param(self, name: str) -> Param | None:
        for p in self.params + self.model_params:
            if p.name == name:
                return p
        return None
