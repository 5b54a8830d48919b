"""Python's cyclic garbage collector in a command's process.

torch, Lightning and MLflow leave hundreds of thousands of objects behind on import, alive
until the process ends, yet every full collection traces them all, and so does the interpreter
on its way out. `gc.freeze()` moves the objects alive at that moment out of the
collector's reach; they are still freed as usual when their last reference goes.
"""

from __future__ import annotations

import atexit
import gc

_opted_in = False
_frozen_before_training = False


def freeze_long_lived_objects() -> None:
    """Call once the heavy imports are done: freezes what is alive now, and what is alive at
    exit; `freeze_before_training` then freezes again before the first fit. What it saves at
    the end of a command: docs/performance.md.
    """
    global _opted_in
    if _opted_in:
        return
    _opted_in = True
    gc.freeze()
    # atexit handlers run before the interpreter's last collections.
    atexit.register(gc.freeze)


def freeze_before_training() -> None:
    """Just before the first fit of a process that called `freeze_long_lived_objects` (a
    library caller's is left alone): freeze what is alive now too, the data, the model and the
    store.

    After a freeze CPython counts no object as long-lived, so the rule that holds a full
    collection back until the long-lived objects have grown by a quarter no longer applies: the
    next full collection comes within tens of thousands of allocations and traces everything
    made since the freeze, during the fit's first `self.log`; frozen again here, the one during
    fit traces only what fit made (docs/performance.md). Once per
    process: before a later fit (a sweep's next trial) it would also freeze, for good, the
    garbage of the earlier ones that no collection has freed yet.
    """
    global _frozen_before_training
    if _opted_in and not _frozen_before_training:
        _frozen_before_training = True
        gc.freeze()
