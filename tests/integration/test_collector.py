"""gc.freeze() in a command's process: what was alive is out of the collector's reach, what
comes after is collected as before, what is alive when the first training starts is frozen
too, and the exit freezes the rest; a process that did not opt in (a library caller's) is
left alone."""

from __future__ import annotations

import json
import subprocess
import textwrap

from ..conftest import PYTHON, cli_env

PROBE = textwrap.dedent(
    """
    import atexit, gc, json
    import mlflow  # a heavy import, as a command does before training
    from dlharness.training.collector import freeze_before_training, freeze_long_lived_objects

    seen = {}
    # Registered first, so it runs last: after the exit handler of freeze_long_lived_objects.
    atexit.register(lambda: print(json.dumps({**seen, "at_exit": gc.get_freeze_count()})))
    freeze_long_lived_objects()
    seen["frozen"] = gc.get_freeze_count()
    freeze_long_lived_objects()  # once per process
    seen["again"] = gc.get_freeze_count()

    class Node:
        pass

    # A reference cycle made after the freeze is garbage the collector still finds.
    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    seen["found"] = gc.collect()
    survivors = [Node() for _ in range(1000)]  # the data and the model of a run
    freeze_before_training()
    seen["before_training"] = gc.get_freeze_count()
    survivors += [Node() for _ in range(1000)]
    freeze_before_training()  # once per process: a sweep's later trials leave gc alone
    seen["before_next_training"] = gc.get_freeze_count()
    """
)

LIBRARY_PROBE = textwrap.dedent(
    """
    import gc
    from dlharness.training.collector import freeze_before_training

    freeze_before_training()
    print(gc.get_freeze_count())
    """
)


def test_imports_frozen_once_later_garbage_collected_and_the_rest_frozen_at_exit():
    done = subprocess.run(
        [PYTHON, "-c", PROBE], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["frozen"] > 100_000  # MLflow's modules, classes, functions
    assert report["again"] == report["frozen"]
    assert report["found"] >= 2  # the two nodes of the cycle (and their dicts)
    assert report["before_training"] >= report["frozen"] + 1000
    assert report["before_next_training"] == report["before_training"]
    assert report["at_exit"] >= report["frozen"] + 2000  # the later survivors too


def test_a_process_that_did_not_opt_in_is_not_frozen_before_training():
    done = subprocess.run(
        [PYTHON, "-c", LIBRARY_PROBE], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
