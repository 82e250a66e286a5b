"""Turn a Plan into a Dask graph: a plain dict you can print before it runs.

Keys:

* ``("write", t, c)``: merge chunk ``c`` of tensor ``t`` and write it; value (bytes read,
  bytes written). These are the graph's outputs.
* ``("stat", t, s, c)`` / ``("stats", t, s)``: for methods with tensor-wide statistics
  split over several chunks, the partial of statistic ``s`` over chunk ``c`` and its
  reduction; the write tasks of tensor ``t`` depend on the last reduction. A tensor that
  is a single chunk computes its statistics inside its write task instead (one read).
"""

from __future__ import annotations

from dmerge.methods import get_method
from dmerge.plan import Plan
from dmerge.tasks import ChunkJob, compute_statistic, context_of, finalize_statistic, merge_chunk


def build_graph(plan: Plan, shard_paths: list[str]) -> tuple[dict, list[tuple]]:
    """Return the graph and its output keys (one per chunk write)."""
    dsk: dict = {}
    outputs: list[tuple] = []
    for ti, tp in enumerate(plan.tensors):
        path = shard_paths[tp.shard]
        jobs = [
            ChunkJob(tp, *tp.chunk_rows(c), out_path=path, compute_dtype=plan.compute_dtype,
                     device=plan.device, seed=plan.seed, allow_nan=plan.allow_nan)
            for c in range(tp.n_chunks)
        ]
        stats_key = None
        method = get_method(tp.method)
        needed = method.statistics_for(context_of(tp)) if method.statistics else []
        if needed and len(jobs) > 1 and not tp.copy_bytes:
            for si, _ in needed:
                partial_keys = []
                for c, job in enumerate(jobs):
                    key = ("stat", ti, si, c)
                    dsk[key] = (compute_statistic, job, si, stats_key)
                    partial_keys.append(key)
                reduced = ("stats", ti, si)
                dsk[reduced] = (finalize_statistic, tp, si, stats_key, partial_keys)
                stats_key = reduced
        for c, job in enumerate(jobs):
            key = ("write", ti, c)
            dsk[key] = (merge_chunk, job, stats_key) if stats_key else (merge_chunk, job)
            outputs.append(key)
    return dsk, outputs
