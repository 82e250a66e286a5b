"""Merge methods, registered by the name a recipe's ``merge_method`` uses.

Adding a method: create ``dmerge/methods/<name>.py`` with one function decorated by
:func:`merge_method`. Every module of this package is imported on first lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Iterable

from dmerge.errors import RecipeError
from dmerge.methods.base import ChunkInputs, MergeMethod, Param, Statistic

_REGISTRY: dict[str, MergeMethod] = {}

_NOT_METHODS = {"base"}


def merge_method(
    name: str,
    *,
    params: Iterable[Param] = (),
    model_params: Iterable[Param] = (),
    requires_base: bool = False,
    statistics: Iterable[Statistic] = (),
    work_tensors: int = 2,
    copies_bytes: bool = False,
    single_source: bool = False,
    random: bool = False,
    raw_inputs: bool = False,
    elementwise: bool = False,
    check: Callable | None = None,
    reference: str = "",
    aliases: Iterable[str] = (),
) -> Callable:
    """Register a function ``ChunkInputs -> Tensor`` as the merge method ``name``."""

    def register(fn: Callable) -> Callable:
        method = MergeMethod(
            name=name,
            fn=fn,
            params=tuple(params),
            model_params=tuple(Param(**{**p.__dict__, "per_model": True}) for p in model_params),
            requires_base=requires_base,
            statistics=tuple(statistics),
            work_tensors=work_tensors,
            copies_bytes=copies_bytes,
            single_source=single_source,
            random=random,
            raw_inputs=raw_inputs,
            elementwise=elementwise,
            check=check,
            reference=reference,
            doc=(fn.__doc__ or "").strip(),
        )
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise ValueError(f"merge method {key!r} registered twice")
            _REGISTRY[key] = method
        fn.method = method
        return fn

    return register


def _load_all() -> None:
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            if info.name not in _NOT_METHODS and not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> MergeMethod:
    """Look up a registered method by its recipe name."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise RecipeError(f"merge_method: unknown method {name!r} (known: {known})") from None


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


__all__ = ["ChunkInputs", "MergeMethod", "Param", "Statistic", "merge_method", "get_method", "available_methods"]
