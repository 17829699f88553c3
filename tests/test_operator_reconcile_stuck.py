"""The reconciler applying the stuck and startup policies, against a fake API server: what it
writes to status, which Events it posts and when (only after the status patch is stored)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import MagicMock

import pytest
from kubeforge_operator.reconcile import Reconciler
from kubernetes.client.exceptions import ApiException

QUOTA = 'pods "demo-trainer-0" is forbidden: exceeded quota: no-pods'


def _response(body: dict[str, Any]) -> MagicMock:
    return MagicMock(data=json.dumps(body).encode())


class FakeCluster:
    """Only what one reconcile pass calls; pods are created into `pods`, the job's other objects into
    `objects` (by kind and name, readable back), refusals raised."""

    def __init__(self, refuse: int | None = None, patch_fails: bool = False):
        self.pods: list[dict[str, Any]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.refuse, self.patch_fails = refuse, patch_fails
        self.core, self.net, self.custom = MagicMock(), MagicMock(), MagicMock()
        self.core.list_namespaced_pod.side_effect = lambda *a, **k: _response({"items": self.pods})
        self.core.create_namespaced_pod.side_effect = self._create_pod
        for kind, create, read in (
            ("Secret", self.core.create_namespaced_secret, self.core.read_namespaced_secret),
            ("ConfigMap", self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            ("Service", self.core.create_namespaced_service, None),
            ("NetworkPolicy", self.net.create_namespaced_network_policy, None),
            ("PersistentVolumeClaim", self.core.create_namespaced_persistent_volume_claim, None),
        ):
            create.side_effect = self._create_object
            if read is not None:
                read.side_effect = lambda name, namespace, kind=kind, **_: self._read(kind, name)
        self.core.delete_namespaced_pod.side_effect = lambda name, *a, **k: self.deleted.append(name) or MagicMock()
        self.custom.patch_namespaced_custom_object_status.side_effect = self._patch

    def _create_object(self, namespace: str, obj: dict[str, Any], **_: Any) -> MagicMock:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="Conflict")
        self.objects[key] = obj
        return MagicMock()

    def _read(self, kind: str, name: str) -> MagicMock:
        if (kind, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return _response(self.objects[(kind, name)])

    def _create_pod(self, namespace: str, pod: dict[str, Any], **_: Any) -> MagicMock:
        if self.refuse:
            error = ApiException(status=self.refuse, reason="Forbidden")
            error.body = json.dumps({"kind": "Status", "reason": "Forbidden", "message": QUOTA})
            raise error
        self.pods.append({**pod, "status": {"phase": "Pending"}})
        return MagicMock()

    def _patch(self, *args: Any, **_: Any) -> MagicMock:
        if self.patch_fails:
            raise ApiException(status=500, reason="etcd timeout")
        self.patches.append(args[-1]["status"])
        return _response({"metadata": {"resourceVersion": str(len(self.patches))}})


def _body(minimal_job: dict[str, Any], status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    minimal_job["spec"].update(scheduling={"gang": "off"}, **spec)
    return {
        "metadata": {"name": "demo", "namespace": "team", "uid": "u1", "resourceVersion": "1"},
        "spec": minimal_job["spec"],
        "status": status or {},
    }


def _pass(
    cluster: FakeCluster, body: dict[str, Any], reconciler: Reconciler | None = None
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """One pass (by a new reconciler, as after an operator restart, unless one is given); the status as
    stored afterwards (merge patch applied) and the Events posted."""
    events: list[tuple[str, str, str]] = []
    reconciler = reconciler or Reconciler(cluster.core, cluster.net, cluster.custom)
    reconciler.reconcile(body, event=lambda *e: events.append(e))
    stored = dict(body["status"])
    for patch in cluster.patches:
        for key, value in patch.items():
            if value is None:
                stored.pop(key, None)
            else:
                stored[key] = value
    cluster.patches.clear()
    return stored, events


def test_a_refused_create_is_in_status_and_in_one_event(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster(refuse=403)
    st, events = _pass(cluster, _body(minimal_job))
    assert st["stuck"] == {
        "pod": "demo-trainer-0",
        "reason": "CreateForbidden",
        "message": f"refused by the API server (403): {QUOTA}",
    }
    assert st["phase"] == "Starting" and "demo-trainer-0: CreateForbidden" in st["message"]
    stuck = next(c for c in st["conditions"] if c["type"] == "Stuck")
    assert (stuck["status"], stuck["reason"]) == ("True", "CreateForbidden")
    assert (
        "Warning",
        "CreateForbidden",
        f"demo-trainer-0: CreateForbidden: refused by the API server (403): {QUOTA}",
    ) in events
    assert st["startingSince"]

    # Refused again on the next pass: the status stays, and no second Event.
    again, events = _pass(cluster, _body(minimal_job, status=st))
    assert again == st and events == []

    # Still refused at the startup deadline: the job fails, naming the refusal.
    again["startingSince"] = _ago(1300)
    failed, _ = _pass(cluster, _body(minimal_job, status=again))
    assert failed["phase"] == "Failed"
    assert (
        f"demo-trainer-0 (not created: CreateForbidden: refused by the API server (403): {QUOTA})"
        in (failed["message"])
    )


def test_no_event_is_posted_when_the_status_write_fails(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster(refuse=403, patch_fails=True)
    events: list[tuple[str, str, str]] = []
    with pytest.raises(ApiException):
        Reconciler(cluster.core, cluster.net, cluster.custom).reconcile(
            _body(minimal_job), event=lambda *e: events.append(e)
        )
    assert events == []  # not even "Starting": the next pass, which writes the state, posts them


def test_a_transient_create_error_is_raised_as_before(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster(refuse=500)
    with pytest.raises(ApiException):
        _pass(cluster, _body(minimal_job))


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_startup_deadline_fails_the_job_naming_each_pod_and_why(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster()
    st, _ = _pass(cluster, _body(minimal_job, startupDeadlineSeconds=30))
    created = {p["metadata"]["name"] for p in cluster.pods}
    trainer = next(p for p in cluster.pods if p["metadata"]["name"] == "demo-trainer-0")
    trainer["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes are available"}
    ]
    st, events = _pass(cluster, _body(minimal_job, status=st, startupDeadlineSeconds=30))
    assert st["stuck"]["reason"] == "Unschedulable" and [e[1] for e in events] == ["Unschedulable"]
    assert not cluster.deleted

    st["startingSince"] = _ago(31)
    st, events = _pass(cluster, _body(minimal_job, status=st, startupDeadlineSeconds=30))
    assert st["phase"] == "Failed"
    assert st["message"].startswith("startupDeadlineSeconds (30 s) passed with 0 of ")
    assert "demo-trainer-0 (Unschedulable: 0/2 nodes are available)" in st["message"]
    assert set(cluster.deleted) == created
    assert ("Warning", "Failed", st["message"]) in events


def test_a_resume_or_a_restart_starts_the_clocks_again(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster()
    old = _ago(10_000)
    st, _ = _pass(cluster, _body(minimal_job, suspend=True, status={"phase": "Running", "startTime": old}))
    assert st["phase"] == "Suspended" and "startTime" not in st and "startingSince" not in st
    # Resumed long after activeDeadlineSeconds would have passed since the first start.
    st, _ = _pass(cluster, _body(minimal_job, suspend=False, activeDeadlineSeconds=60, status=st))
    assert st["phase"] == "Starting" and st["startTime"] != old and st["startingSince"]

    trainer = next(p for p in cluster.pods if p["metadata"]["name"] == "demo-trainer-0")
    trainer["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}],
    }
    st, _ = _pass(cluster, _body(minimal_job, status=st))
    assert st["phase"] == "Restarting" and "startingSince" not in st  # the next pass starts it anew
