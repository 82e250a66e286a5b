"""Run mergekit (the reference implementation, a test-only dependency) on a recipe.

dmerge never imports mergekit; only the differential tests do, through this helper.
mergekit computes in the recipe's ``dtype``; to compare with dmerge's float64 math the
tests run it with ``dtype: float32`` and ``out_dtype`` set to the output type.
"""

from __future__ import annotations

import logging

import pytest
import yaml


def run_mergekit(recipe_text: str, out_dir: str, *, dtype: str = "float32", out_dtype: str | None = "bfloat16",
                 seed: int | None = None, allow_crimes: bool = False, unsafe_truncate_embeddings: bool = False) -> str:
    """Merge with mergekit in-process; returns out_dir. Skips the test if mergekit is absent."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    doc = yaml.safe_load(recipe_text)
    doc["dtype"] = dtype
    if out_dtype is not None:
        doc["out_dtype"] = out_dtype
    config = MergeConfiguration.model_validate(doc)
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(
        config,
        out_dir,
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed,
                             allow_crimes=allow_crimes, lazy_unpickle=False,
                             unsafe_truncate_embeddings=unsafe_truncate_embeddings),
    )
    return out_dir
