"""Merge methods, registered by the name a recipe's ``merge_method`` uses.

Adding a method: create ``dmerge/methods/<name>.py`` with one function decorated by
:func:`merge_method`. Every module of this package is imported on first lookup.

The first lookup may come from several threads at once (a fresh Dask worker), so the
registry is filled under a lock and published only once complete: no thread ever sees
a half-filled one.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import threading
from typing import Callable, Iterable

from dmerge.errors import RecipeError
from dmerge.methods.base import ChunkInputs, MergeMethod, Param, Statistic

# Registrations land in _FILLING; lookups read _PUBLISHED, a complete snapshot that is
# replaced, never changed, so reading it needs no lock. Two locks: _LOAD_LOCK is held while
# the modules are imported; _FILL_LOCK only for a dict update, so that a thread importing
# a method module itself (e.g. unpickling a task) can register without waiting on a load
# that waits on its import.
_FILLING: dict[str, MergeMethod] = {}
_PUBLISHED: dict[str, MergeMethod] | None = None
_LOAD_LOCK = threading.RLock()
_FILL_LOCK = threading.Lock()
_loading_thread: int | None = None  # the thread importing the method modules, if any

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
    raw_inputs: bool = False,
    elementwise: bool = False,
    check: Callable | None = None,
    reference: str = "",
    aliases: Iterable[str] = (),
) -> Callable:
    """Register a function ``ChunkInputs -> Tensor`` as the merge method ``name``."""

    def register(fn: Callable) -> Callable:
        global _PUBLISHED
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
            raw_inputs=raw_inputs,
            elementwise=elementwise,
            check=check,
            reference=reference,
            doc=(fn.__doc__ or "").strip(),
        )
        with _FILL_LOCK:
            for key in (name, *aliases):
                if key in _FILLING:
                    raise ValueError(f"merge method {key!r} registered twice")
                _FILLING[key] = method
            if _PUBLISHED is not None:  # registered after loading (a plugin): publish anew
                _PUBLISHED = dict(_FILLING)
        fn.method = method
        return fn

    return register


def _registry() -> dict[str, MergeMethod]:
    """Every registered method, importing this package's modules on first use."""
    global _PUBLISHED, _loading_thread
    published = _PUBLISHED
    if published is not None:
        return published
    with _LOAD_LOCK:
        if _PUBLISHED is not None:
            return _PUBLISHED
        if _loading_thread == threading.get_ident():
            return _FILLING  # a lookup from a method module while it is imported: what is there so far
        _loading_thread = threading.get_ident()
        try:
            for info in pkgutil.iter_modules(__path__):
                if info.name not in _NOT_METHODS and not info.name.startswith("_"):
                    importlib.import_module(f"{__name__}.{info.name}")
        finally:
            _loading_thread = None
        with _FILL_LOCK:
            _PUBLISHED = dict(_FILLING)
        return _PUBLISHED


def _reset_locks_after_fork() -> None:
    # A fork while another thread held a lock would leave the child's copy locked forever.
    global _LOAD_LOCK, _FILL_LOCK, _loading_thread
    _LOAD_LOCK, _FILL_LOCK = threading.RLock(), threading.Lock()
    _loading_thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)


def get_method(name: str) -> MergeMethod:
    """Look up a registered method by its recipe name."""
    registry = _registry()
    try:
        return registry[name]
    except KeyError:
        close = difflib.get_close_matches(name, registry, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(registry))}"
        raise RecipeError(f"merge_method: unknown method {name!r}; {hint}") from None


def available_methods() -> list[str]:
    """Names of every registered method (aliases included), sorted."""
    return sorted(_registry())


__all__ = ["ChunkInputs", "MergeMethod", "Param", "Statistic", "merge_method", "get_method", "available_methods"]
