"""dmerge: run mergekit-style merge recipes as a Dask graph of byte-range tasks.

The pipeline is recipe -> :class:`dmerge.recipe.Recipe` -> :class:`dmerge.plan.Plan`
-> Dask graph (:mod:`dmerge.graph`) -> output model folder. Merge methods live in
:mod:`dmerge.methods`, one small module each.
"""

from dmerge.errors import DMergeError, RecipeError

__version__ = "0.1.0"

__all__ = ["DMergeError", "RecipeError", "__version__"]
