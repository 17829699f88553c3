"""The capacity gate's policy (`scheduling.gang: capacity`): admit a job only when all of its pods fit.

Without a gang scheduler, a job whose pods start one by one can hold GPUs while it waits for the
rest forever. The operator therefore admits a job (creates its first pod) only when every GPU pod
of the job fits on the cluster's ready, schedulable nodes, after

- the GPUs of every unfinished pod already on a node (any namespace, any owner), and
- the GPUs of the pods of jobs admitted earlier that are not on a node yet: created and waiting for
  the scheduler, or not created at all (the pass that admitted the job has not created them yet, or
  a restart deleted them). A job counts as admitted from the pass the gate let it through until it
  finishes, is suspended or is deleted.

Counting only pods already on a node let two jobs created together both pass, each to end up with
a part of its gang. The pods of earlier jobs are placed first, then the new job's, each list
first-fit decreasing on the node with the most GPUs free; a scheduler decides the real placement
afterwards. Pure: kubeforge_operator.inventory keeps the cluster's state and applies this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeforge import contract
from kubeforge.spec import RLJobSpec

# Phases of a job that holds no admission: it ended, or its pods were deleted by spec.suspend.
NOT_ADMITTED_PHASES = ("Succeeded", "Failed", "Suspended")


@dataclass(frozen=True)
class Node:
    """A ready, schedulable node: its allocatable GPUs and its labels."""

    name: str
    gpus: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Need:
    """One GPU pod of a job: the GPUs it asks for, on one node matching `selector`."""

    pod: str  # the instance name (trainer-1): messages, and matching a pod that exists
    gpus: int
    selector: Mapping[str, str] = field(default_factory=dict)


def needs(spec: RLJobSpec) -> tuple[Need, ...]:
    """Every pod of the job that holds GPUs, in start order."""
    found = []
    for inst in contract.instances(spec):
        gpus = contract.gpus_for(spec, inst.role)
        if gpus:
            selector = {**spec.scheduling.node_selector, **getattr(spec.roles, inst.role).node_selector}
            found.append(Need(inst.name, gpus, selector))
    return tuple(found)


def shortfall(nodes: Sequence[Node], used: Mapping[str, int], reserved: Sequence[Need], wanted: Sequence[Need]) -> str:
    """Why `wanted` (a job's pods) does not fit now; empty when it does.

    `used`: GPUs held per node by unfinished pods on it. `reserved`: the pods of jobs admitted earlier
    that are on no node yet; they are placed first, and a new job waits while they do not all fit."""
    free = {n.name: n.gpus - used.get(n.name, 0) for n in nodes}
    labels = {n.name: n.labels for n in nodes}
    free_now = sum(max(g, 0) for g in free.values())
    held = sum(n.gpus for n in reserved)

    def place(need: Need) -> bool:
        fits = [n for n in free if free[n] >= need.gpus and need.selector.items() <= labels[n].items()]
        if not fits:
            return False
        free[max(fits, key=lambda n: free[n])] -= need.gpus
        return True

    where = f"free now: {free_now} on {len(nodes)} ready nodes"
    if held:
        where += f", {held} of them held for {len(reserved)} pods of jobs admitted earlier that are on no node yet"
    for need in sorted(reserved, key=lambda n: -n.gpus):
        if not place(need):
            return f"jobs admitted earlier wait for their GPUs first ({need.pod} of one needs {need.gpus}); {where}"
    for need in sorted(wanted, key=lambda n: -n.gpus):
        if not place(need):
            total = sum(n.gpus for n in wanted)
            return (
                f"the job needs {total} GPUs in {len(wanted)} pods ({need.pod} alone needs {need.gpus} on one node); "
                f"{where}"
            )
    return ""


def admitted_before(spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Whether a stored RLJob holds an admission (read back when an operator starts, or takes over):
    a capacity-gated job whose status says the gate let it through and that has not ended since."""
    gang = (spec.get("scheduling") or {}).get("gang", "capacity")
    if gang != "capacity" or status.get("phase") in NOT_ADMITTED_PHASES:
        return False
    return any(c.get("type") == "Scheduled" and c.get("status") == "True" for c in status.get("conditions") or [])
