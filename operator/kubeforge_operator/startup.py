"""The startup deadline (spec.startupDeadlineSeconds): a start that does not finish in time fails the job.

A pod that never becomes Ready (a bad image, no node that fits, a refused create) would otherwise
keep the job Starting forever while its other pods hold their GPUs.

The clock (status.startingSince) starts at the first reconcile pass that creates, or tries to
create, the pods of a start: the job's first start, each restart made by the failure policy, each
resume after suspend. It stops, and is cleared, once every pod is Ready. It does not run while a
pod waits at a scheduling gate (queued by Kueue, holding no node), nor while the capacity gate
keeps the job Pending (no pod exists yet): that waiting holds no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# How many not-ready pods the failure message names; the rest are counted.
NAMED = 4


@dataclass(frozen=True)
class Clock:
    since: datetime | None  # the new status.startingSince (None: not running)
    expired: bool


def tick(since: datetime | None, deadline: int | None, *, all_ready: bool, queued: bool, now: datetime) -> Clock:
    """Advance the clock by one reconcile pass. `deadline` None: no limit (the clock still runs)."""
    if all_ready or queued:
        return Clock(None, False)
    if since is None:
        return Clock(now, False)
    return Clock(since, deadline is not None and (now - since).total_seconds() > deadline)


def explain(deadline: int, ready: int, total: int, not_ready: list[tuple[str, str]]) -> str:
    """The failure message: which pods were still not ready, each with why ((pod, why) pairs)."""
    named = "; ".join(f"{pod} ({why})" if why else pod for pod, why in not_ready[:NAMED])
    more = f"; and {len(not_ready) - NAMED} more" if len(not_ready) > NAMED else ""
    return f"startupDeadlineSeconds ({deadline} s) passed with {ready} of {total} pods ready; not ready: {named}{more}"
