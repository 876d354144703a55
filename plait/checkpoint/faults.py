"""Named points where a fault test kills a rank: ``PLAIT_FAULT=commit:rank=0:step=8``.

``PLAIT_FAULT`` holds comma-separated entries ``POINT[:rank=R][:step=S][:attempt=A]``; a rank that
reaches a point matching an entry (its ``RANK``, the step being saved or loaded, torchrun's
``TORCHELASTIC_RESTART_COUNT``) SIGKILLs itself there, as a power cut or the OOM killer would. The
points, in the order a save and a load pass them:

    write     a rank's shard is written, not yet fsynced           (the checkpoint is a .partial)
    async     the same, in the background thread of a non-blocking save
    manifest  rank 0 wrote and fsynced the manifest, nothing renamed yet
    rename    rank 0 moved an existing checkpoint of the same step aside, the new one not yet in place
    commit    the new checkpoint is in place, the old copy not yet deleted, the ranks not yet told
    prune     an old checkpoint is moved aside for deletion, not yet deleted
    load      every rank has read and checked what it loads, nothing copied into the model yet

Unset (always, outside fault tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(point: str, step: int | None = None) -> None:
    """SIGKILL this process if ``PLAIT_FAULT`` names ``point`` for this rank, step and attempt."""
    spec = os.environ.get("PLAIT_FAULT")
    if not spec:
        return
    here = {
        "rank": os.environ.get("RANK", "0"),
        "step": str(step),
        "attempt": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
    }
    for entry in spec.split(","):
        name, *conditions = entry.strip().split(":")
        wanted = dict(condition.split("=", 1) for condition in conditions)
        if name == point and all(here.get(k) == v for k, v in wanted.items()):
            os.kill(os.getpid(), signal.SIGKILL)
