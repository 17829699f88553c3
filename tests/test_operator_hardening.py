"""The operator's hardening rules, against a fake API server: no silent adoption of a Secret or
ConfigMap the RLJob does not own, a progress token bound to the job's uid, and a reconcile daemon
that survives unreadable pods and transport errors, with a deadline on every API call."""

from __future__ import annotations

import asyncio
import base64
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest.mock import MagicMock

import kopf
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kubeforge_operator import handlers, metrics
from kubeforge_operator.api import REQUEST_TIMEOUT
from kubeforge_operator.progress import ProgressReceiver
from kubeforge_operator.reconcile import FOREIGN, UNREADABLE_POD, Reconciler
from kubernetes.client.exceptions import ApiException
from test_operator_reconcile_stuck import FakeCluster, _ago, _body, _pass, _response
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError


def _owner(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "x/v1", "kind": kind, "name": name, "uid": uid, "controller": True}


def _seed(kind: str, owners: list[dict[str, Any]]) -> dict[str, Any]:
    name = {"Secret": "demo-token", "ConfigMap": "demo-spec"}[kind]
    return {"kind": kind, "metadata": {"name": name, "namespace": "team", "ownerReferences": owners}}


# -- 12: no silent adoption ---------------------------------------------------------------------

# (case, the object already there, refused?, words the message must have)
ADOPTION_CASES = [
    ("secret with no owner", _seed("Secret", []), True, "no owner"),
    ("secret of another controller", _seed("Secret", [_owner("Deployment", "web", "d1")]), True, "Deployment web"),
    ("secret of an earlier job of this name", _seed("Secret", [_owner("RLJob", "demo", "u0")]), True, "earlier RLJob"),
    ("config map with no owner", _seed("ConfigMap", []), True, "no owner"),
    ("config map of another job", _seed("ConfigMap", [_owner("RLJob", "other", "u9")]), True, "RLJob other"),
    # Owned, but not as controller: not this job's.
    (
        "secret merely referencing the job",
        _seed("Secret", [{**_owner("RLJob", "demo", "u1"), "controller": False}]),
        True,
        "no owner",
    ),
    ("secret of this job (an earlier pass)", _seed("Secret", [_owner("RLJob", "demo", "u1")]), False, ""),
    ("config map of this job", _seed("ConfigMap", [_owner("RLJob", "demo", "u1")]), False, ""),
]


@pytest.mark.parametrize(("case", "existing", "refused", "words"), ADOPTION_CASES, ids=[c[0] for c in ADOPTION_CASES])
def test_a_secret_or_config_map_the_job_does_not_own_is_refused(
    minimal_job: dict[str, Any], case: str, existing: dict[str, Any], refused: bool, words: str
) -> None:
    cluster = FakeCluster()
    key = (existing["kind"], existing["metadata"]["name"])
    cluster.objects[key] = existing
    st, events = _pass(cluster, _body(minimal_job))
    if not refused:
        assert cluster.pods and "stuck" not in st
        assert cluster.objects[key] is existing  # used as it is
        return
    what = f"{existing['kind']} {existing['metadata']['name']}"
    assert st["stuck"]["pod"] == what and st["stuck"]["reason"] == FOREIGN
    assert words in st["stuck"]["message"] and "not used" in st["stuck"]["message"]
    assert what in st["message"] and st["phase"] == "Starting"
    (warning,) = [e for e in events if e[1] == FOREIGN]
    assert warning[0] == "Warning" and what in warning[2] and ("delete" in warning[2].lower())
    # Nothing else is created for the job: no pod, no Service, no NetworkPolicy, no claim, no token.
    assert cluster.pods == [] and list(cluster.objects) == [key]

    # Refused again on the next pass, without a second Event; once the object is gone, the job starts.
    st, events = _pass(cluster, _body(minimal_job, status=st))
    assert st["stuck"]["reason"] == FOREIGN and events == [] and cluster.pods == []
    del cluster.objects[key]
    st, _ = _pass(cluster, _body(minimal_job, status=st))
    assert cluster.pods and "stuck" not in st
    assert cluster.objects[key]["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_a_job_refused_a_foreign_object_fails_at_the_startup_deadline_naming_it(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster()
    cluster.objects[("Secret", "demo-token")] = _seed("Secret", [])
    st, _ = _pass(cluster, _body(minimal_job, startupDeadlineSeconds=30))
    st["startingSince"] = _ago(31)
    st, _ = _pass(cluster, _body(minimal_job, status=st, startupDeadlineSeconds=30))
    assert st["phase"] == "Failed" and "not created: Secret demo-token: ForeignObject" in st["message"]


# -- 14: the progress token follows the job's uid --------------------------------------------------


class FakeProgressApi:
    """The RLJobs and their token Secrets by name, as the receiver reads them."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}  # name -> uid
        self.tokens: dict[str, tuple[str, str]] = {}  # name -> (owner uid, token)
        self.core, self.custom = MagicMock(), MagicMock()
        self.core.read_namespaced_secret.side_effect = self._secret
        self.custom.get_namespaced_custom_object.side_effect = self._job
        self.custom.patch_namespaced_custom_object_status.side_effect = self._patch

    def run(self, name: str, uid: str, token: str) -> None:
        self.jobs[name], self.tokens[name] = uid, (uid, token)

    def _secret(self, name: str, namespace: str, **_: Any) -> MagicMock:
        job = name.removesuffix("-token")
        if job not in self.tokens:
            raise ApiException(status=404, reason="Not Found")
        uid, token = self.tokens[job]
        return _response(
            {
                "metadata": {"name": name, "ownerReferences": [_owner("RLJob", job, uid)]},
                "data": {"controller": base64.b64encode(token.encode()).decode()},
            }
        )

    def _job(self, group: str, version: str, namespace: str, plural: str, name: str, **_: Any) -> dict[str, Any]:
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name, "uid": self.jobs[name]}}

    def _patch(self, *args: Any, **_: Any) -> dict[str, Any]:
        if args[4] not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return {}


def _reports(receiver: ProgressReceiver, steps: list[Any]) -> list[int]:
    """Run `steps` in order: a callable is called, a token is POSTed as demo's report; the statuses."""

    async def go() -> list[int]:
        codes = []
        async with TestClient(TestServer(receiver.app())) as http:
            for step in steps:
                if callable(step):
                    step()
                    continue
                response = await http.post(
                    "/progress/team/demo", json={"step": 1}, headers={"Authorization": f"Bearer {step}"}
                )
                codes.append(response.status)
        return codes

    return asyncio.run(go())


@pytest.mark.parametrize("tracked", [False, True], ids=["read from the API server", "told by the daemon"])
def test_a_re_created_job_gets_its_new_token_accepted_and_the_old_one_refused(tracked: bool) -> None:
    api = FakeProgressApi()
    receiver = ProgressReceiver(api.core, api.custom)

    def first() -> None:
        api.run("demo", "u1", "old")
        if tracked:
            receiver.track("team", "demo", "u1")

    def delete() -> None:
        del api.jobs["demo"], api.tokens["demo"]
        if tracked:
            receiver.forget("team", "demo", "u1")

    def again() -> None:
        api.run("demo", "u2", "new")
        if tracked:
            receiver.track("team", "demo", "u2")

    codes = _reports(receiver, [first, "old", "wrong", delete, "old", again, "new", "old"])
    assert codes == [200, 401, 401, 200, 401]


def test_a_token_secret_the_job_does_not_own_is_not_trusted() -> None:
    api = FakeProgressApi()
    receiver = ProgressReceiver(api.core, api.custom)

    def re_created_before_collection() -> None:
        # The new job exists; its Secret is still the earlier job's (the garbage collector is behind).
        api.run("demo", "u1", "old")
        api.jobs["demo"] = "u2"
        receiver.track("team", "demo", "u2")

    def collected() -> None:
        api.run("demo", "u2", "new")

    codes = _reports(receiver, [re_created_before_collection, "old", collected, "new", "old"])
    assert codes == [401, 200, 401]


# -- 16: a reconcile daemon that does not die --------------------------------------------------------

BAD_REPLICAS = ["x", "-1", "1.5", "", "٣"]


@pytest.mark.parametrize("replica", BAD_REPLICAS)
def test_a_pod_with_an_unreadable_replica_label_is_reported_once_and_ignored(
    minimal_job: dict[str, Any], replica: str
) -> None:
    cluster = FakeCluster()
    stray = {
        "metadata": {
            "name": "demo-by-hand",
            "uid": "p1",
            "labels": {
                "kubeforge.dev/job": "demo",
                "kubeforge.dev/role": "generator",
                "kubeforge.dev/replica": replica,
            },
        },
        "status": {"phase": "Running"},
    }
    cluster.pods.append(stray)
    reconciler = Reconciler(cluster.core, cluster.net, cluster.custom)  # one, as in the operator
    st, events = _pass(cluster, _body(minimal_job), reconciler)
    assert len(cluster.pods) > 1 and st["phase"] == "Starting"  # the job's own pods are created
    (warning,) = [e for e in events if e[1] == UNREADABLE_POD]
    assert warning[0] == "Warning" and "demo-by-hand" in warning[2] and "kubeforge.dev/replica" in warning[2]
    _, events = _pass(cluster, _body(minimal_job, status=st), reconciler)
    assert not [e for e in events if e[1] == UNREADABLE_POD]  # once per pod
    assert "demo-by-hand" not in cluster.deleted


def _failed(pod: dict[str, Any]) -> None:
    pod["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"name": "x", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}],
    }


# (case, spec fields, status, what to do to the pods after the first pass)
TIMEOUT_CASES = [
    ("first start", {}, {}, None),
    ("a failed pod is replaced", {}, {}, lambda pods: _failed(pods[0])),
    ("suspended", {"suspend": True}, {"phase": "Running"}, None),
    ("ttl after finishing", {"ttlSecondsAfterFinished": 0}, {"phase": "Succeeded", "completionTime": _ago(5)}, None),
]


@pytest.mark.parametrize(("case", "spec", "status", "then"), TIMEOUT_CASES, ids=[c[0] for c in TIMEOUT_CASES])
def test_every_api_call_of_a_pass_has_a_request_timeout(
    minimal_job: dict[str, Any], case: str, spec: dict[str, Any], status: dict[str, Any], then: Any
) -> None:
    cluster = FakeCluster()
    st, _ = _pass(cluster, _body(minimal_job, status=dict(status), **spec))
    if then:
        then(cluster.pods)
        _pass(cluster, _body(minimal_job, status=st, **spec))
    _assert_all_timed(cluster.core, cluster.net, cluster.custom)


def test_the_capacity_gate_and_the_progress_receiver_have_request_timeouts(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster()
    # Without a watch-fed inventory (kubeforge_operator.inventory), the gate lists nodes and pods itself.
    cluster.core.list_node.side_effect = lambda **_: _response({"items": []})
    cluster.core.list_pod_for_all_namespaces.side_effect = lambda **_: _response({"items": []})
    minimal_job["spec"]["roles"] = {"trainer": {"gpusPerNode": 1}}
    body = _body(minimal_job)
    body["spec"]["scheduling"] = {"gang": "capacity"}
    Reconciler(cluster.core, cluster.net, cluster.custom).reconcile(body, event=lambda *e: None)
    assert cluster.core.list_node.called and cluster.core.list_pod_for_all_namespaces.called
    api = FakeProgressApi()
    _reports(ProgressReceiver(api.core, api.custom), [lambda: api.run("demo", "u1", "t"), "t"])
    _assert_all_timed(cluster.core, cluster.net, cluster.custom, api.core, api.custom)


def _assert_all_timed(*apis: MagicMock) -> None:
    calls = [c for api in apis for c in api.mock_calls if c[0] and "." not in c[0]]
    assert calls
    untimed = [c[0] for c in calls if c.kwargs.get("_request_timeout") != REQUEST_TIMEOUT]
    assert untimed == []


TRANSPORT_ERRORS = [
    MaxRetryError(None, "/api/v1/pods", reason="connection refused"),
    ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
    ReadTimeoutError(None, "/api/v1/pods", "read timed out"),
    ConnectionResetError(104, "Connection reset by peer"),
]


@pytest.mark.parametrize("error", TRANSPORT_ERRORS, ids=[type(e).__name__ for e in TRANSPORT_ERRORS])
def test_a_transport_error_is_a_temporary_error_and_keeps_the_jobs_metrics(error: Exception) -> None:
    memo = kopf.Memo()
    memo.reconciler = MagicMock()
    memo.reconciler.reconcile.side_effect = error
    memo.custom = MagicMock()
    memo.executor = ThreadPoolExecutor(max_workers=1)
    memo.progress_receiver = receiver = MagicMock()
    body = {"metadata": {"name": "demo", "namespace": "team", "uid": "u1", "resourceVersion": "1"}, "spec": {}}
    metrics.observe_phase("team", "demo", "Running")
    try:
        with pytest.raises(kopf.TemporaryError) as raised:
            asyncio.run(
                handlers.reconcile_job(
                    name="demo", namespace="team", body=body, memo=memo, logger=logging.getLogger("test")
                )
            )
        assert raised.value.delay == handlers.RESYNC_SECONDS
        assert metrics._phases.get(("team", "demo")) == "Running"  # the series stay for the retry
        receiver.forget.assert_not_called()
    finally:
        memo.executor.shutdown()
        metrics.observe_phase("team", "demo", None)


def test_an_api_error_is_retried_in_the_loop_and_a_gone_job_ends_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 0.01)
    memo = kopf.Memo()
    memo.reconciler = MagicMock()
    memo.reconciler.reconcile.side_effect = ApiException(status=500, reason="etcd timeout")
    memo.custom = MagicMock()
    memo.custom.get_namespaced_custom_object.side_effect = ApiException(status=404, reason="Not Found")
    memo.executor = ThreadPoolExecutor(max_workers=1)
    memo.progress_receiver = receiver = MagicMock()
    body = {"metadata": {"name": "demo", "namespace": "team", "uid": "u1", "resourceVersion": "1"}, "spec": {}}
    metrics.observe_phase("team", "demo", "Running")
    try:
        asyncio.run(
            asyncio.wait_for(
                handlers.reconcile_job(
                    name="demo", namespace="team", body=body, memo=memo, logger=logging.getLogger("test")
                ),
                timeout=30,
            )
        )
    finally:
        memo.executor.shutdown()
    # The first pass's 500 was logged; the next read found the job gone: its series and token go.
    assert ("team", "demo") not in metrics._phases
    receiver.track.assert_called_once_with("team", "demo", "u1")
    receiver.forget.assert_called_once_with("team", "demo", "u1")


def test_the_daemon_reads_the_job_with_a_request_timeout() -> None:
    memo = kopf.Memo()
    memo.custom = MagicMock()
    memo.custom.get_namespaced_custom_object.side_effect = ApiException(status=404, reason="Not Found")
    assert handlers._reconcile_once(memo, "team", "demo", None, logging.getLogger("test")) == (False, None)
    assert memo.custom.get_namespaced_custom_object.call_args.kwargs["_request_timeout"] == REQUEST_TIMEOUT
