"""The capacity gate on a real control plane: two jobs created together, of which only one fits, are
admitted one at a time (kubeforge_operator.capacity and .inventory)."""

from __future__ import annotations

from typing import Any

import pytest
from cluster import GROUP, PLURAL, VERSION, Operator, wait_for
from kubernetes import client
from test_operator import active_pods, create, job_body, status

pytestmark = pytest.mark.cluster

JOBS = ("first", "second")  # 10 GPUs each (job_body); the KWOK nodes have 16 in all


def _scheduled(st: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == "Scheduled"), {})


def test_two_jobs_created_together_are_admitted_one_at_a_time(namespace: str, operator: Operator) -> None:
    for name in JOBS:
        create(namespace, job_body(name))

    def one_running() -> str | None:
        with_pods = [name for name in JOBS if active_pods(namespace, name)]
        # Never both: the second job's pods would hold GPUs while waiting for the rest of its gang.
        assert len(with_pods) <= 1, f"both jobs were admitted: {with_pods}"
        return next((n for n in JOBS if status(namespace, n).get("phase") == "Running"), None)

    admitted = wait_for("one job Running", one_running, timeout=90, operator=operator)
    waiting = next(n for n in JOBS if n != admitted)
    st = wait_for("the other Pending", lambda: (s := status(namespace, waiting)).get("phase") == "Pending" and s)
    scheduled = _scheduled(st)
    assert (scheduled["status"], scheduled["reason"]) == ("False", "InsufficientGPUs")
    assert "needs 10 GPUs in 4 pods" in scheduled["message"], scheduled["message"]
    assert _scheduled(status(namespace, admitted))["status"] == "True"
    assert not active_pods(namespace, waiting)

    # The admitted job goes (its pods too, at once, as a kubelet does once the containers have exited):
    # its GPUs are free again, and the other job is admitted at its next pass.
    client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, admitted)
    core = client.CoreV1Api()
    for pod in core.list_namespaced_pod(namespace, label_selector=f"kubeforge.dev/job={admitted}").items:
        core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
    wait_for(
        "the other job Running", lambda: status(namespace, waiting).get("phase") == "Running", timeout=60,
        operator=operator,
    )  # fmt: skip
