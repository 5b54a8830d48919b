"""Which process of a multi-process (DDP) launch leads: it alone opens and logs the MLflow run."""

from __future__ import annotations

import os


def is_launch_leader() -> bool:
    """Whether this process will be global rank 0, judged from the launcher's environment.

    torch.distributed is not up yet when the run must be opened, so this reads what the
    launchers set: torchrun `RANK`; Lightning's own launcher `LOCAL_RANK` (in the processes it
    starts) with the user's `NODE_RANK`; SLURM `SLURM_PROCID`; LSF `JSM_NAMESPACE_RANK`.
    `LOCAL_RANK` goes before `SLURM_PROCID`, which Lightning's children inherit unchanged
    when one SLURM task starts several devices. A plain process is the leader.
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"]) == 0 and int(env.get("NODE_RANK", "0")) == 0
    for name in ("SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK"):
        if name in env:
            return int(env[name]) == 0
    return True
