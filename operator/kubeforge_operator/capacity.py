"""The capacity gate for `scheduling.gang: capacity`: create no pod until all of them fit.

Without a gang scheduler, a job whose pods start one by one can hold GPUs while it waits for
the rest forever. The operator therefore checks that every pod of the job fits on the
cluster's ready, schedulable nodes (allocatable GPUs minus those requested by running pods)
before creating the first one. First-fit decreasing over nodes; a scheduler decides the
real placement afterwards.
"""

from __future__ import annotations

from typing import Any

from kubeforge import contract
from kubeforge.spec import RLJobSpec
from kubernetes import client

from kubeforge_operator.api import REQUEST_TIMEOUT
from kubeforge_operator.resources import GPU_RESOURCE


def _gpus(quantity: Any) -> int:
    return int(str(quantity or "0"))


def free_gpus(core: client.CoreV1Api) -> dict[str, tuple[int, dict[str, str]]]:
    """GPUs free on each ready, schedulable node: name -> (free GPUs, node labels)."""
    nodes = {}
    for node in core.list_node(_request_timeout=REQUEST_TIMEOUT).items:
        ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
        if not ready or node.spec.unschedulable:
            continue
        nodes[node.metadata.name] = [
            _gpus((node.status.allocatable or {}).get(GPU_RESOURCE)),
            node.metadata.labels or {},
        ]
    running = core.list_pod_for_all_namespaces(
        field_selector="status.phase!=Succeeded,status.phase!=Failed", _request_timeout=REQUEST_TIMEOUT
    )
    for pod in running.items:
        if pod.spec.node_name in nodes:
            for c in pod.spec.containers:
                limits = (c.resources.limits or {}) if c.resources else {}
                nodes[pod.spec.node_name][0] -= _gpus(limits.get(GPU_RESOURCE))
    return {name: (free, labels) for name, (free, labels) in nodes.items()}


def shortfall(core: client.CoreV1Api, spec: RLJobSpec) -> str:
    """Why the job's pods do not all fit right now; empty when they do."""
    wanted = sorted(
        ((contract.gpus_for(spec, i.role), i) for i in contract.instances(spec) if contract.gpus_for(spec, i.role)),
        key=lambda pair: -pair[0],
    )
    if not wanted:
        return ""
    nodes = free_gpus(core)
    free = {name: gpus for name, (gpus, _) in nodes.items()}
    for gpus, inst in wanted:
        selector = {**spec.scheduling.node_selector, **getattr(spec.roles, inst.role).node_selector}
        fits = [n for n, (_, labels) in nodes.items() if free[n] >= gpus and selector.items() <= labels.items()]
        if not fits:
            total = sum(g for g, _ in wanted)
            return (
                f"the job needs {total} GPUs in {len(wanted)} pods ({inst.name} alone needs {gpus} on one node); "
                f"free now: {sum(free.values())} on {len(nodes)} ready nodes"
            )
        best = max(fits, key=lambda n: free[n])
        free[best] -= gpus
    return ""
