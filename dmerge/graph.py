"""Turn a Plan into a Dask graph: a plain dict you can print before it runs.

Keys:

* ``("write", t, c)``: merge chunk ``c`` of tensor ``t`` and write it; value (bytes read,
  bytes written). These are the graph's outputs.
* ``("stat", t, s, c)`` / ``("stats", t, s)``: for methods with tensor-wide statistics
  split over several chunks, the partial of statistic ``s`` over chunk ``c`` and its
  reduction; the write tasks of tensor ``t`` depend on the last reduction. A tensor that
  is a single chunk computes its statistics inside its write task instead (one read).
* ``("vpad", t, b)`` / ``("vpads", t)``: for a re-indexed vocabulary tensor with padding
  rows (``pad_to_multiple_of``), per-source row sums over fixed block ``b`` and the
  padding means they give; statistics and writes of tensor ``t`` depend on them.
"""

from __future__ import annotations

import dataclasses

from dmerge.methods import get_method
from dmerge.plan import Plan
from dmerge.tasks import (ChunkJob, compute_statistic, context_of, finalize_statistic, merge_chunk,
                          vocab_pad_finalize, vocab_pad_partial)


def build_graph(plan: Plan, shard_paths: list[str]) -> tuple[dict, list[tuple]]:
    """Return the graph and its output keys (one per chunk write)."""
    dsk: dict = {}
    outputs: list[tuple] = []
    for ti, tp in enumerate(plan.tensors):
        path = shard_paths[tp.shard]
        rm = tp.row_map
        # Tasks carry the tensor without its (vocabulary-sized) row map, and only the
        # window of the map their rows need.
        light = dataclasses.replace(tp, row_map=None) if rm is not None else tp
        jobs = []
        for c in range(tp.n_chunks):
            r0, r1 = tp.chunk_rows(c)
            jobs.append(ChunkJob(light, r0, r1, out_path=path, compute_dtype=plan.compute_dtype,
                                 device=plan.device, seed=plan.seed, allow_nan=plan.allow_nan,
                                 row_map=rm.window(r0, r1) if rm is not None else None))
        pad_key = None
        if rm is not None and rm.has_padding and len(jobs) > 1 and not tp.copy_bytes:
            block_keys = []
            for b, (a, z) in enumerate(rm.pad_blocks()):
                key = ("vpad", ti, b)
                dsk[key] = (vocab_pad_partial, light, rm.window(a, z))
                block_keys.append(key)
            pad_key = ("vpads", ti)
            dsk[pad_key] = (vocab_pad_finalize, rm.n_tokens, block_keys)
        stats_key = None
        method = get_method(tp.method)
        needed = method.statistics_for(context_of(tp)) if method.statistics else []
        if needed and len(jobs) > 1 and not tp.copy_bytes:
            for si, _ in needed:
                partial_keys = []
                for c, job in enumerate(jobs):
                    key = ("stat", ti, si, c)
                    dsk[key] = (compute_statistic, job, si, stats_key, pad_key)
                    partial_keys.append(key)
                reduced = ("stats", ti, si)
                dsk[reduced] = (finalize_statistic, light, si, stats_key, partial_keys)
                stats_key = reduced
        for c, job in enumerate(jobs):
            key = ("write", ti, c)
            dsk[key] = (merge_chunk, job, stats_key, pad_key)
            outputs.append(key)
    return dsk, outputs
