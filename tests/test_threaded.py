"""The thread-pool executor of merges without a cluster (dmerge/threaded.py)."""

from __future__ import annotations

import threading
import time

import pytest

from dmerge.threaded import _physical_memory, local_memory_limit, run_graph


def _add(*xs):
    return sum(xs)


def _total(parts):
    return sum(parts)


def test_runs_dependencies_first_and_reports_each_output():
    dsk = {
        ("p", 0): (_add, 1, 2),
        ("p", 1): (_add, 3),
        ("r",): (_total, [("p", 0), ("p", 1)]),  # a list of keys, as a reduction's partials
        ("w", 0): (_add, ("r",), 10),
        ("w", 1): (_add, ("r",), 20),
    }
    seen = {}
    reruns = run_graph(dsk, [("w", 0), ("w", 1)], threads=2, on_result=seen.__setitem__)
    assert seen == {("w", 0): 16, ("w", 1): 26} and reruns == 0


def test_keeps_at_most_threads_tasks_running():
    running, most = [0], [0]
    lock = threading.Lock()

    def task(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i

    dsk = {("w", i): (task, i) for i in range(12)}
    seen = {}
    run_graph(dsk, list(dsk), threads=3, on_result=seen.__setitem__)
    assert len(seen) == 12 and most[0] == 3


def test_a_failing_task_is_retried_then_raised():
    tries = []

    def flaky():
        tries.append(1)
        if len(tries) < 2:
            raise OSError("transient")
        return 7

    seen = {}
    assert run_graph({("w", 0): (flaky,)}, [("w", 0)], threads=1, on_result=seen.__setitem__, retries=1) == 1
    assert seen == {("w", 0): 7}

    def broken():
        raise ValueError("always")

    with pytest.raises(ValueError, match="always"):
        run_graph({("w", 0): (broken,)}, [("w", 0)], threads=2, on_result=seen.__setitem__, retries=2)


def test_an_interruption_stops_the_run_after_the_running_tasks():
    started = []

    def slow(i):
        started.append(i)
        time.sleep(0.05)
        return i

    calls = [0]

    def poll():
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt

    dsk = {("w", i): (slow, i) for i in range(50)}
    with pytest.raises(KeyboardInterrupt):
        run_graph(dsk, list(dsk), threads=2, on_result=lambda k, v: None, poll=poll)
    n = len(started)
    time.sleep(0.2)
    assert n < 50 and len(started) == n  # nothing started after the interruption was raised


def test_memory_limit_spellings():
    total = _physical_memory()
    assert 0 < local_memory_limit("auto") <= total
    assert local_memory_limit("0.5") == int(0.5 * total)
    assert local_memory_limit(4 << 30) == 4 << 30
    assert local_memory_limit("0") is None
