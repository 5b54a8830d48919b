"""Python's cyclic garbage collector in a command's process.

torch, Lightning and MLflow leave ≈600 000 objects behind on import, alive until the process
ends, yet every full collection traces them all (0.3–0.4 s each on 2 cores) and so does the
interpreter on its way out. `gc.freeze()` moves the objects alive at that moment out of the
collector's reach; they are still freed as usual when their last reference goes.
"""

from __future__ import annotations

import atexit
import functools
import gc


@functools.cache
def freeze_long_lived_objects() -> None:
    """Call once the heavy imports are done: freezes what is alive now, and what is alive at
    exit. Once per process (measured 2026-12-01: `dlharness-train` ends 0.3 s after its last
    line instead of 2.7 s; the full collection at the end of a run 0.07 s instead of 0.4 s).
    """
    gc.freeze()
    # atexit handlers run before the interpreter's last collections.
    atexit.register(gc.freeze)
