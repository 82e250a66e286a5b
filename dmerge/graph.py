"""Turn a Plan into a Dask graph: a plain dict you can print before it runs.

Every key starts with a name carrying the run id (:meth:`dmerge.plan.Plan.fingerprint`
of the plan and its output place), so two merges on one scheduler never share a key,
and a resumed run of the same plan has the same keys. With ``r`` the run id:

* ``("dmerge-write-r", t, c)``: merge chunk ``c`` of tensor ``t`` and write it; value
  (bytes read, bytes written). These are the graph's outputs.
* ``("dmerge-stat-r", t, s, c)`` / ``("dmerge-stats-r", t, s)``: for methods with
  tensor-wide statistics split over several chunks, the partial of statistic ``s`` over
  chunk ``c`` and its reduction; the write tasks of tensor ``t`` depend on the last
  reduction. A statistic that reads only some chunks (``Statistic.reads``) is one
  ``stats`` task for the whole tensor instead. A tensor that is a single chunk computes its statistics inside its write
  task instead (one read).
* ``("dmerge-vpad-r", t, b)`` / ``("dmerge-vpads-r", t)``: for a re-indexed vocabulary
  tensor with padding rows (``pad_to_multiple_of``), per-source row sums over fixed block
  ``b`` and the padding means they give; statistics and writes of tensor ``t`` depend
  on them.

* ``("dmerge-computed-r", -1, ...)``: the tasks of the plan's computations (routers of
  a MoE: a chain of tasks, one decoder layer each, see :mod:`dmerge.moe.hidden`); the
  write of a computed tensor (``("dmerge-write-r", t, 0)``, via :func:`write_computed`)
  depends on the key of its part. They all use tensor index -1, so :func:`waves` keeps
  them in one wave with the computed tensors' writes.

A resumed run passes the write units already done (``done``): a tensor whose every chunk
is done is left out; one with any chunk left gets its statistic and padding tasks again
(they are not kept between runs) and the writes of the chunks left.

Which of these tasks a tensor has is decided in one place, :func:`tensor_tasks`; the
plan's task count and byte estimate come from it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmerge.methods import get_method
from dmerge.methods.base import context_of

if TYPE_CHECKING:
    from dmerge.tasks import ChunkJob

# The tensor index of computation tasks in graph keys (see waves).
COMPUTATION_INDEX = -1


@dataclass(frozen=True)
class TensorTasks:
    """The tasks one planned tensor becomes."""

    n_chunks: int  # one write task each
    pad_blocks: tuple[tuple[int, int], ...]  # padding-mean blocks (one task each, plus their reduction)
    statistics: tuple[int, ...]  # statistics run as tasks over the chunks
    # per statistic: reads every chunk (True: a task per chunk + a reduction) or only
    # some (None: one task for the tensor, which reads the chunks that need it in turn)
    statistics_read: tuple[bool | None, ...]

    @property
    def count(self) -> int:
        pads = len(self.pad_blocks) + 1 if self.pad_blocks else 0
        stats = sum(self.n_chunks + 1 if reads else 1 for reads in self.statistics_read)
        return self.n_chunks + pads + stats


def tensor_tasks(tp) -> TensorTasks:
    """Which tasks a planned tensor becomes (see the module docstring)."""
    if tp.computed is not None:  # its computation's tasks are counted once, by the plan
        return TensorTasks(tp.n_chunks, (), (), ())
    rm = tp.row_map
    several = tp.n_chunks > 1 and not tp.copy_bytes
    pads = tuple(rm.pad_blocks()) if rm is not None and rm.has_padding and several else ()
    stats: tuple[int, ...] = ()
    reads: tuple[bool | None, ...] = ()
    method = get_method(tp.method)
    if method.statistics and several:
        needed = method.statistics_for(context_of(tp))
        stats = tuple(si for si, _ in needed)
        reads = tuple(True if s.reads is None else None for _, s in needed)
    return TensorTasks(tp.n_chunks, pads, stats, reads)


def count_tasks(plan) -> int:
    """The number of graph keys :func:`build_graph` makes for ``plan``."""
    return (sum(tensor_tasks(tp).count for tp in plan.tensors)
            + sum(c.n_tasks for c in getattr(plan, "computations", [])))


def estimate_reads(plan) -> tuple[int, int]:
    """Parent bytes the run will fetch: (certainly, at most). Every task reads its chunk's
    rows of every source; a statistic that reads only where earlier ones leave the
    answer open (radix select's second look) makes the two differ. Remote parents
    (URLs) are fetched once for all the passes where the statistic passes' spill
    (:mod:`dmerge.io.spill`) serves the later ones, up to once per pass where it cannot
    (a full spill, passes of a chunk on different machines)."""
    from dmerge.io.storage import is_url

    certain = at_most = 0
    for tp in plan.tensors:
        tasks = tensor_tasks(tp)
        passes = 1 + (1 if tasks.pad_blocks else 0)
        reading = sum(1 for r in tasks.statistics_read if r)
        remote = sum(tp.source_bytes_read(s) for s in tp.sources if is_url(s.file))
        local = tp.bytes_read - remote
        spilled = reading > 0 and tp.row_map is None  # vocabulary gathers do not spill
        certain += local * (passes + reading) + remote * (passes if spilled else passes + reading)
        at_most += tp.bytes_read * (passes + len(tasks.statistics_read))
    for c in getattr(plan, "computations", []):
        certain += c.bytes_read
        at_most += c.bytes_read
    return certain, at_most


def key_names(run_id: str) -> dict[str, str]:
    """The key name of each kind of task, for one run."""
    return {kind: f"dmerge-{kind}-{run_id}"
            for kind in ("write", "part", "stat", "stats", "vpad", "vpads", "computed")}


def build_graph(plan, sinks, run_id: str,
                done: set[tuple[int, int]] | frozenset = frozenset()) -> tuple[dict, list[tuple]]:
    """Return the graph and its output keys (one per chunk write, then the report key of
    each computation that has one), leaving out the writes of ``done``: (tensor index,
    chunk index) pairs a resumed run has already. ``sinks``: where the bytes go (see
    :mod:`dmerge.io.sinks`): a list with one sink per shard, or a function ``(tensor
    index, TensorPlan) -> sink`` for outputs that give each tensor its own (a zarr array
    per tensor)."""
    # the task functions import torch: only a run needs them, not planning
    from dmerge.tasks import merge_chunk, write_computed

    sink_of = sinks if callable(sinks) else (lambda ti, tp: sinks[tp.shard])
    names = key_names(run_id)
    dsk: dict = {}
    outputs: list[tuple] = []
    todo_of = {ti: todo for ti, tp in enumerate(plan.tensors)
               if (todo := [c for c in range(tp.n_chunks) if (ti, c) not in done])}
    part_keys, reports = _computations(dsk, names, plan, set(todo_of))
    for ti, todo in todo_of.items():
        tp = plan.tensors[ti]
        jobs = _chunk_jobs(plan, tp, sink_of(ti, tp))
        if tp.computed is not None:
            for c in todo:
                key = (names["write"], ti, c)
                dsk[key] = (write_computed, jobs[c], part_keys[tp.computed.computation][tp.computed.part])
                outputs.append(key)
            continue
        stats_key, pad_key = _reductions(dsk, names, ti, tp, jobs)
        for c in todo:
            key = (names["write"], ti, c)
            # the first write reports the bytes the tensor's reductions read
            dsk[key] = (merge_chunk, jobs[c], stats_key, pad_key, c == todo[0])
            outputs.append(key)
    return dsk, outputs + reports


def _computations(dsk: dict, names: dict, plan, unwritten: set[int]) -> tuple[dict, list[tuple]]:
    """Add the tasks of the plan's computations that are needed to ``dsk``: those with a
    tensor in ``unwritten`` (tensor indices with something left to write), and those that
    report (a resumed MoE's routing report is written again, whatever was done before).
    Returns (computation index -> its value keys, the report keys)."""
    computations = getattr(plan, "computations", [])
    part_keys: dict[int, dict] = {}
    reports: list[tuple] = []
    needed = {tp.computed.computation for ti, tp in enumerate(plan.tensors)
              if tp.computed is not None and ti in unwritten}
    needed |= {ci for ci, c in enumerate(computations) if getattr(c, "report_file", None)}
    for ci in sorted(needed):
        comp_dsk, parts, report = computations[ci].tasks(f"{names['computed']}-{ci}", plan.device)
        dsk.update(comp_dsk)
        part_keys[ci] = parts
        if report is not None:
            reports.append(report)
    return part_keys, reports


def build_part_graph(plan, parts: list, sinks: list, run_id: str,
                     done: set[tuple[int, int]] | frozenset = frozenset()) -> tuple[dict, list[tuple]]:
    """The graph of a merge into multipart uploads: one task per upload part
    (:func:`dmerge.io.object_output.plan_parts`), keyed ``("dmerge-part-r", t, shard,
    part number)`` with ``t`` its first tensor, which merges the part's write units in
    memory and uploads them. Parts in ``done`` ((shard, part number) pairs a resumed run
    finds uploaded) are left out, with the statistics only they needed."""
    from dmerge.tasks import PartJob, upload_part

    names = key_names(run_id)
    dsk: dict = {}
    outputs: list[tuple] = []
    todo = [p for p in parts if (p.shard, p.number) not in done]
    needed = sorted({t for p in todo for t, _ in p.members})
    part_keys, reports = _computations(dsk, names, plan, set(needed))
    jobs: dict[int, list[ChunkJob]] = {}
    reductions: dict[int, tuple] = {}
    for ti in needed:
        tp = plan.tensors[ti]
        jobs[ti] = _chunk_jobs(plan, tp, None)  # the part task gives each job its buffer
        # a computed tensor is written from its computation's values
        reductions[ti] = (None, None) if tp.computed is not None else _reductions(dsk, names, ti, tp, jobs[ti])
    reported: set[int] = set()
    for p in todo:
        members = []
        for ti, c in p.members:
            tp = plan.tensors[ti]
            computed = part_keys[tp.computed.computation][tp.computed.part] if tp.computed is not None else None
            members.append([jobs[ti][c], *reductions[ti], ti not in reported, computed])
            reported.add(ti)
        header = plan.shards[p.shard].header if p.header else None
        first = p.members[0][0] if p.members else plan.shards[p.shard].tensors[0]
        key = (names["part"], first, p.shard, p.number)
        dsk[key] = (upload_part, PartJob(sinks[p.shard], p.number, p.start, p.stop, header), members)
        outputs.append(key)
    return dsk, outputs + reports


def part_groups(parts: list, plan=None) -> dict[int, int]:
    """Tensor index -> the first tensor of the run of tensors that share upload parts:
    a part holding the tail of one tensor and the start of the next ties their tasks
    into one group, which :func:`waves` keeps in one wave. With ``plan``, tensors in a
    part with a computed tensor join the computations' group (``COMPUTATION_INDEX``)."""
    parent: dict[int, int] = {}

    def root(t: int) -> int:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    for p in parts:
        tensors = sorted({t for t, _ in p.members})
        if plan is not None and any(plan.tensors[t].computed is not None for t in tensors):
            tensors = [COMPUTATION_INDEX] + tensors  # written from a computation: in its wave
        for t in tensors[1:]:
            a, b = root(tensors[0]), root(t)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {t: root(t) for t in parent}


def _chunk_jobs(plan, tp, sink) -> list[ChunkJob]:
    """One job per chunk of a planned tensor, writing to ``sink``."""
    from dmerge.tasks import ChunkJob

    rm = tp.row_map
    # Jobs carry the tensor without its (vocabulary-sized) row map, and only the window
    # of the map their rows need.
    light = dataclasses.replace(tp, row_map=None) if rm is not None else tp
    jobs = []
    for c in range(tp.n_chunks):
        r0, r1 = tp.chunk_rows(c)
        jobs.append(ChunkJob(light, r0, r1, sink=sink, compute_dtype=plan.compute_dtype,
                             device=plan.device, seed=plan.seed, allow_nan=plan.allow_nan,
                             row_map=rm.window(r0, r1) if rm is not None else None))
    return jobs


def _reductions(dsk: dict, names: dict, ti: int, tp, jobs: list[ChunkJob]) -> tuple:
    """Add a tensor's padding-mean and statistic tasks to ``dsk``; returns the keys its
    writes depend on: (last statistic's reduction, padding means), either None."""
    from dmerge.tasks import (compute_statistic, finalize_statistic, statistic_over_chunks, vocab_pad_finalize,
                              vocab_pad_partial)

    tasks = tensor_tasks(tp)
    rm = tp.row_map
    light = jobs[0].tensor
    pad_key = None
    if tasks.pad_blocks:
        block_keys = []
        for b, (a, z) in enumerate(tasks.pad_blocks):
            key = (names["vpad"], ti, b)
            dsk[key] = (vocab_pad_partial, light, rm.window(a, z))
            block_keys.append(key)
        pad_key = (names["vpads"], ti)
        dsk[pad_key] = (vocab_pad_finalize, rm.n_tokens, block_keys)
    stats_key = None
    for si, reads in zip(tasks.statistics, tasks.statistics_read):
        reduced = (names["stats"], ti, si)
        if not reads:
            # a second look that earlier statistics mostly settle (radix select's fine
            # pass): one task, not one per chunk, keeps the graph small
            dsk[reduced] = (statistic_over_chunks, jobs, si, stats_key, pad_key)
            stats_key = reduced
            continue
        partial_keys = []
        for c, job in enumerate(jobs):
            key = (names["stat"], ti, si, c)
            dsk[key] = (compute_statistic, job, si, stats_key, pad_key)
            partial_keys.append(key)
        dsk[reduced] = (finalize_statistic, light, si, stats_key, partial_keys)
        stats_key = reduced
    return stats_key, pad_key


def waves(dsk: dict, outputs: list[tuple], tasks_per_wave: int,
          kind_of=lambda tensor_index: None, group_of: dict[int, int] | None = None
          ) -> list[tuple[dict, list[tuple], object]]:
    """The graph cut into waves of whole tensors (a tensor's tasks depend only on each
    other), about ``tasks_per_wave`` tasks each, in plan order: submitted one after
    another, the scheduler starts the first tensors' work while it takes in the rest.
    ``group_of`` maps tensors whose tasks depend on each other (upload parts shared by
    several tensors, :func:`part_groups`) to one group, kept in one wave.
    A wave holds tensors of one ``kind_of(tensor index)`` (e.g. arithmetic or byte
    copies, which may go to different workers); returns (graph, outputs, kind) each."""
    from dmerge.tasks import write_computed

    group_of = group_of or {}

    def unit(key) -> int:
        # computations and the computed tensors written from them travel together
        if key[1] in computed:
            return COMPUTATION_INDEX
        return group_of.get(key[1], key[1])

    computed = {key[1] for key in dsk if key[1] == COMPUTATION_INDEX}
    if computed:
        computed |= {key[1] for key, task in dsk.items()
                     if isinstance(task, tuple) and task and task[0] is write_computed}
    by_tensor: dict[int, dict] = {}
    for key, task in dsk.items():
        by_tensor.setdefault(unit(key), {})[key] = task
    outputs_of: dict[int, list] = {}
    for key in outputs:
        outputs_of.setdefault(unit(key), []).append(key)
    result: list[tuple[dict, list[tuple], object]] = []
    for ti in sorted(by_tensor):
        kind = "compute" if ti == COMPUTATION_INDEX else kind_of(ti)
        if not result or len(result[-1][0]) >= tasks_per_wave or result[-1][2] != kind:
            result.append(({}, [], kind))
        result[-1][0].update(by_tensor[ti])
        result[-1][1].extend(outputs_of.get(ti, []))
    return result
