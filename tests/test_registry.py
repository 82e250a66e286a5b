"""The method registry: loaded once, completely, whichever thread asks first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the registry must not be loaded before the threads start.
_RACE = textwrap.dedent("""
    import sys, threading, time
    from dmerge.methods import get_method

    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widens any race window

    names = sys.argv[1].split(",")
    barrier = threading.Barrier(len(names))
    failures = []

    def look_up(i, name):
        barrier.wait()
        time.sleep(i * 0.001)  # spread the first lookups over the time loading takes
        try:
            assert get_method(name).name == name
        except Exception as e:  # report every failure, not just the first
            failures.append(f"{name}: {e}")

    threads = [threading.Thread(target=look_up, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
""")

NAMES = ["ties", "linear", "slerp", "dare_ties", "della", "task_arithmetic", "passthrough", "sce", "karcher",
         "model_stock", "nuslerp", "multislerp", "nearswap", "breadcrumbs", "arcee_fusion", "dare_linear"]


def test_concurrent_first_lookups_see_the_whole_registry():
    """16 threads look up different methods at the same moment, in several fresh interpreters."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    for attempt in range(4):
        names = NAMES[attempt:] + NAMES[:attempt]  # a different thread wins the race each time
        out = subprocess.run([sys.executable, "-c", _RACE, ",".join(names)], capture_output=True, text=True, env=env)
        assert out.returncode == 0, f"attempt {attempt}: {out.stdout}{out.stderr}"
