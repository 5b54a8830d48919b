"""Python's cyclic garbage collector in a command's process.

torch, Lightning and MLflow leave ≈600 000 objects behind on import, alive until the process
ends, yet every full collection traces them all (0.3–0.4 s each on 2 cores) and so does the
interpreter on its way out. `gc.freeze()` moves the objects alive at that moment out of the
collector's reach; they are still freed as usual when their last reference goes.
"""

from __future__ import annotations

import atexit
import gc

_opted_in = False


def freeze_long_lived_objects() -> None:
    """Call once the heavy imports are done: freezes what is alive now, and what is alive at
    exit; `freeze_before_training` then freezes again before each fit. Measured 2026-12-01:
    `dlharness-train` ends 0.3 s after its last line instead of 2.7 s; the full collection at
    the end of a run 0.07 s instead of 0.4 s.
    """
    global _opted_in
    if _opted_in:
        return
    _opted_in = True
    gc.freeze()
    # atexit handlers run before the interpreter's last collections.
    atexit.register(gc.freeze)


def freeze_before_training() -> None:
    """Just before a fit, in a process that called `freeze_long_lived_objects` (a library
    caller's is left alone): freeze what is alive now too, the data, the model and the store.

    After a freeze CPython counts no object as long-lived, so the rule that holds a full
    collection back until the long-lived objects have grown by a quarter no longer applies: the
    next full collection comes within ≈70 000 allocations and traces everything made since the
    freeze. Measured 2026-12-01 on digits: 0.15 s, during the fit's first `self.log`; frozen
    again here, the one during fit traces only what fit made (≈7 ms on heavy).
    """
    if _opted_in:
        gc.freeze()
