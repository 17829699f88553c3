"""Leader election on a real control plane (kubeforge_operator.leader): two operators watch one namespace;
only the one holding the Lease creates pods and writes status, and the other takes over when it stops
(at once: it lets the Lease go) or dies (once the Lease's duration has passed)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from cluster import Operator, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_operator import create, job_body, pods, running

pytestmark = pytest.mark.cluster

LEASE = "kubeforge-operator"
# Shorter than the defaults (15, 10, 2), so that a take-over after a crash is quick to test.
DURATION, RENEW, RETRY = 4.0, 3.0, 0.5
TIMING = ("--lease-duration", str(DURATION), "--lease-renew-deadline", str(RENEW), "--lease-retry-period", str(RETRY))


def _holder(namespace: str) -> str | None:
    try:
        return client.CoordinationV1Api().read_namespaced_lease(LEASE, namespace).spec.holder_identity
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _metric(operator: Operator, name: str) -> float:
    """The sum of a metric's series on this operator's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((f"{name} ", f"{name}{{"))
    )


def _serving(operator: Operator) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").status_code == 200
    except httpx.HTTPError:
        return False


def _replaced(namespace: str, pod: str, by: Operator) -> None:
    """Delete a pod of the job; the leader `by` creates it again."""
    before = _metric(by, "kubeforge_operator_pods_created_total")
    old = pods(namespace)[pod].metadata.uid
    client.CoreV1Api().delete_namespaced_pod(f"grpo-{pod}", namespace, grace_period_seconds=0)
    wait_for(
        f"{pod} created again", lambda: (p := pods(namespace).get(pod)) is not None and p.metadata.uid != old,
        timeout=60, operator=by,
    )  # fmt: skip
    assert _metric(by, "kubeforge_operator_pods_created_total") == before + 1


def test_one_of_two_operators_reconciles_and_the_other_takes_over(
    cluster: Path, namespace: str, tmp_path: Path
) -> None:
    first = Operator(cluster, namespace, tmp_path / "first.log", TIMING)
    second = Operator(cluster, namespace, tmp_path / "second.log", TIMING)
    first.start()
    try:
        wait_for("the first operator leads", lambda: _holder(namespace) == first.identity, operator=first)
        second.start()
        create(namespace, job_body())
        wait_for("phase Running", lambda: running(namespace), timeout=90, operator=first)
        wait_for("the second operator up", lambda: _serving(second), operator=second)
        # The one that waits made no pass: it created no pod and wrote no status.
        assert _metric(first, "kubeforge_operator_pods_created_total") == 6
        assert _metric(first, "kubeforge_operator_reconcile_seconds_count") > 0
        assert _metric(second, "kubeforge_operator_pods_created_total") == 0
        assert _metric(second, "kubeforge_operator_reconcile_seconds_count") == 0
        assert _holder(namespace) == first.identity

        # Stopped, the leader lets the Lease go: the other takes over at its next try.
        first.stop()
        started = time.monotonic()
        wait_for("the second operator leads", lambda: _holder(namespace) == second.identity, operator=second)
        assert time.monotonic() - started < DURATION, "taken over only once the Lease expired"
        _replaced(namespace, "generator-0", by=second)

        # The first comes back and waits; the leader dies without letting go: the first takes over once
        # the Lease has not been renewed for its duration.
        first.start()
        time.sleep(2 * RETRY)
        assert _holder(namespace) == second.identity
        second.kill()
        started = time.monotonic()
        wait_for("the first operator leads again", lambda: _holder(namespace) == first.identity, operator=first)
        assert time.monotonic() - started < DURATION + RENEW + 2
        _replaced(namespace, "generator-1", by=first)
        wait_for("phase Running", lambda: running(namespace), timeout=60, operator=first)
    finally:
        first.stop()
        second.stop()
