"""A module imported on first use: ``from dmerge.lazy import torch``.

Planning (``dmerge plan``, the first second of ``dmerge run``) reads JSON headers only,
yet the method modules it needs for their parameters and statistics also hold the
tensor math. Importing torch costs about a second here; modules whose top level only
*defines* things take torch from this proxy instead, and torch is imported when a
function first touches one of its attributes (a task, a statistic).

After that first touch the proxy shares the real module's namespace, so an attribute
lookup costs what it costs on the module itself. A module using the proxy must not read
torch attributes at import time (constants built from dtypes are made on first use)
and keeps its annotations unevaluated (``from __future__ import annotations``).
"""

from __future__ import annotations

import importlib
import threading


class LazyModule:
    """Stands for the module ``name`` until an attribute is read, then becomes it."""

    def __init__(self, name: str):
        object.__setattr__(self, "_lazy_name", name)
        object.__setattr__(self, "_lazy_lock", threading.Lock())

    def __getattr__(self, attr: str):
        # only reached while the module is not loaded (afterwards the instance
        # dictionary is the module's, which holds every attribute the module has)
        try:
            name = object.__getattribute__(self, "_lazy_name")
        except AttributeError:  # loaded: the module has no such attribute
            raise AttributeError(f"module {self.__dict__.get('__name__')!r} has no attribute {attr!r}") from None
        with object.__getattribute__(self, "_lazy_lock"):
            module = importlib.import_module(name)
            object.__setattr__(self, "__dict__", module.__dict__)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazily imported module {self.__dict__.get('__name__') or self._lazy_name!r}>"


torch = LazyModule("torch")

__all__ = ["LazyModule", "torch"]
