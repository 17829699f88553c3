"""The operator's hardening rules, against a fake API server: no silent adoption of a spec
ConfigMap the RLJob does not own, tokens derived from the job's uid and checked without reading a
Secret, and a reconcile daemon
that survives unreadable pods and transport errors, with a deadline on every API call."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import kopf
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kubeforge import auth
from kubeforge_operator import handlers, metrics
from kubeforge_operator.api import REQUEST_TIMEOUT
from kubeforge_operator.progress import ProgressReceiver
from kubeforge_operator.reconcile import FOREIGN, UNREADABLE_POD, Reconciler
from kubeforge_operator.signing import Signer, SigningKeyError
from kubernetes.client.exceptions import ApiException
from test_operator_reconcile_stuck import FakeCluster, _ago, _body, _pass, _response
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError


def _owner(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "x/v1", "kind": kind, "name": name, "uid": uid, "controller": True}


def _seed(kind: str, owners: list[dict[str, Any]], name: str = "demo-spec") -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "team", "ownerReferences": owners}}


# -- 12: no silent adoption ---------------------------------------------------------------------

# (case, the object already there, refused?, words the message must have)
ADOPTION_CASES = [
    ("config map with no owner", _seed("ConfigMap", []), True, "no owner"),
    (
        "config map of another controller",
        _seed("ConfigMap", [_owner("Deployment", "web", "d1")]),
        True,
        "Deployment web",
    ),
    (
        "config map of an earlier job of this name",
        _seed("ConfigMap", [_owner("RLJob", "demo", "u0")]),
        True,
        "earlier RLJob",
    ),  # fmt: skip
    ("config map of another job", _seed("ConfigMap", [_owner("RLJob", "other", "u9")]), True, "RLJob other"),
    # Owned, but not as controller: not this job's.
    (
        "config map merely referencing the job",
        _seed("ConfigMap", [{**_owner("RLJob", "demo", "u1"), "controller": False}]),
        True,
        "no owner",
    ),
    ("config map of this job (an earlier pass)", _seed("ConfigMap", [_owner("RLJob", "demo", "u1")]), False, ""),
    # The token Secret's name carries the job's uid: a Secret made before the job never has it, and the
    # operator, which may not read Secrets, never needs to look at one.
    ("a secret under the job's old token name", _seed("Secret", [], "demo-token"), False, ""),
    (
        "this job's secret (an earlier pass)",
        _seed("Secret", [_owner("RLJob", "demo", "u1")], "demo-token-u1"),
        False,
        "",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("case", "existing", "refused", "words"), ADOPTION_CASES, ids=[c[0] for c in ADOPTION_CASES])
def test_a_config_map_the_job_does_not_own_is_refused(
    minimal_job: dict[str, Any], case: str, existing: dict[str, Any], refused: bool, words: str
) -> None:
    cluster = FakeCluster()
    key = (existing["kind"], existing["metadata"]["name"])
    cluster.objects[key] = existing
    st, events = _pass(cluster, _body(minimal_job))
    assert not cluster.core.read_namespaced_secret.called
    if not refused:
        assert cluster.pods and "stuck" not in st
        assert cluster.objects[key] is existing  # used, or ignored, as it is
        volumes = [v for p in cluster.pods for v in p["spec"]["volumes"] if v["name"] == "tokens"]
        assert {v["secret"]["secretName"] for v in volumes} == {"demo-token-u1"}
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
    cluster.objects[("ConfigMap", "demo-spec")] = _seed("ConfigMap", [])
    st, _ = _pass(cluster, _body(minimal_job, startupDeadlineSeconds=30))
    st["startingSince"] = _ago(31)
    st, _ = _pass(cluster, _body(minimal_job, status=st, startupDeadlineSeconds=30))
    assert st["phase"] == "Failed" and "not created: ConfigMap demo-spec: ForeignObject" in st["message"]


def test_the_token_secret_holds_the_tokens_derived_from_the_uid(minimal_job: dict[str, Any]) -> None:
    signer = Signer(b"k" * 32)
    cluster = FakeCluster()
    _pass(cluster, _body(minimal_job), Reconciler(cluster.core, cluster.net, cluster.custom, signer=signer))
    secret = cluster.objects[("Secret", "demo-token-u1")]
    assert {k: secret["stringData"][k] for k in auth.CREDENTIALS} == signer.tokens("u1")
    # Deleted by hand: made again with the same tokens, which the running pods hold.
    del cluster.objects[("Secret", "demo-token-u1")]
    cluster.pods.clear()
    _pass(cluster, _body(minimal_job), Reconciler(cluster.core, cluster.net, cluster.custom, signer=signer))
    assert cluster.objects[("Secret", "demo-token-u1")]["stringData"] == secret["stringData"]


# -- 14 and 19: the progress token follows the job's uid; no Secret is read to check it --------------

KEY = b"operator-signing-key-of-32-bytes!"


class FakeProgressApi:
    """The RLJobs by name, as the receiver reads them."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}  # name -> uid
        self.custom = MagicMock()
        self.custom.get_namespaced_custom_object.side_effect = self._job
        self.custom.patch_namespaced_custom_object_status.side_effect = self._patch

    def _job(self, group: str, version: str, namespace: str, plural: str, name: str, **_: Any) -> dict[str, Any]:
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return {"metadata": {"name": name, "uid": self.jobs[name]}}

    def _patch(self, *args: Any, **_: Any) -> dict[str, Any]:
        if args[4] not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        return {}


def _controller_token(uid: str, key: bytes = KEY) -> str:
    return Signer(key).token(uid, auth.CONTROLLER)


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
    receiver = ProgressReceiver(api.custom, Signer(KEY))
    old, new = _controller_token("u1"), _controller_token("u2")

    def first() -> None:
        api.jobs["demo"] = "u1"
        if tracked:
            receiver.track("team", "demo", "u1")

    def delete() -> None:
        del api.jobs["demo"]
        if tracked:
            receiver.forget("team", "demo", "u1")

    def again() -> None:
        api.jobs["demo"] = "u2"
        if tracked:
            receiver.track("team", "demo", "u2")

    codes = _reports(receiver, [first, old, "wrong", delete, old, again, new, old])
    assert codes == [200, 401, 401, 200, 401]


# (case, the token presented, accepted?)
TOKEN_CASES = [
    ("the controller's token", _controller_token("u1"), True),
    ("the job token every pod holds", Signer(KEY).token("u1", auth.JOB), False),
    ("the trainer's token", Signer(KEY).token("u1", auth.TRAINER), False),
    ("the controller's token under another key", _controller_token("u1", b"x" * 32), False),
    ("another job's controller token", _controller_token("u9"), False),
    ("nothing", "", False),
]


@pytest.mark.parametrize(("case", "token", "accepted"), TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_only_the_controllers_token_of_this_job_under_this_key_reports(case: str, token: str, accepted: bool) -> None:
    api = FakeProgressApi()
    api.jobs["demo"] = "u1"
    assert _reports(ProgressReceiver(api.custom, Signer(KEY)), [token]) == [200 if accepted else 401]


# (case, key file content or None for absent, error words or None)
KEY_FILE_CASES = [
    ("absent: made, private", None, None),
    ("given", "a" * 64 + "\n", None),
    ("too short", "short", "needs at least 32"),
]


@pytest.mark.parametrize(("case", "content", "error"), KEY_FILE_CASES, ids=[c[0] for c in KEY_FILE_CASES])
def test_the_signing_key_file(tmp_path: Path, case: str, content: str | None, error: str | None) -> None:
    path = tmp_path / "keys" / "key"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    if error:
        with pytest.raises(SigningKeyError, match=error):
            Signer.from_file(path)
        return
    signer = Signer.from_file(path)
    if content is None:
        assert path.stat().st_mode & 0o777 == 0o600
    # Every replica and every restart that reads the file derives the same tokens.
    assert Signer.from_file(path).tokens("u1") == signer.tokens("u1") != signer.tokens("u2")
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no temp file left


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
    api.jobs["demo"] = "u1"
    assert _reports(ProgressReceiver(api.custom, Signer(KEY)), [_controller_token("u1")]) == [200]
    _assert_all_timed(cluster.core, cluster.net, cluster.custom, api.custom)


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


# -- 13: spec edits reach the running pods -------------------------------------------------------------


def _peers(cluster: FakeCluster) -> dict[str, list[str]]:
    return json.loads(cluster.objects[("ConfigMap", "demo-spec")]["data"]["peers.json"])


def test_a_spec_edit_rewrites_the_spec_and_peers_once_per_generation(minimal_job: dict[str, Any]) -> None:
    cluster = FakeCluster()
    cluster.core.patch_namespaced_config_map.side_effect = lambda name, ns, body, **_: (
        cluster.objects[("ConfigMap", name)]["data"].update(body["data"]) or MagicMock()
    )

    def edited(status: dict[str, Any], generation: int, replicas: int) -> dict[str, Any]:
        body = _body(minimal_job, status=status, roles={"generator": {"replicas": replicas}})
        body["metadata"]["generation"] = generation
        return body

    st, _ = _pass(cluster, edited({}, 1, 1))
    assert st["observedGeneration"] == 1 and not cluster.core.patch_namespaced_config_map.called  # created so
    assert len(_peers(cluster)["generator"]) == 1
    # Scaled up: the pods already running read the new peers; the new generator pod is created after.
    st, _ = _pass(cluster, edited(st, 2, 3))
    assert st["observedGeneration"] == 2 and cluster.core.patch_namespaced_config_map.call_count == 1
    assert [u.split(".")[0] for u in _peers(cluster)["generator"]] == [f"http://demo-generator-{i}" for i in range(3)]
    assert (
        json.loads(cluster.objects[("ConfigMap", "demo-spec")]["data"]["spec.json"])["roles"]["generator"]["replicas"]
        == 3
    )
    assert {p["metadata"]["name"] for p in cluster.pods} >= {"demo-generator-1", "demo-generator-2"}
    # Written once per generation, not on every pass.
    _pass(cluster, edited(st, 2, 3))
    assert cluster.core.patch_namespaced_config_map.call_count == 1
    env = {e["name"]: e["value"] for e in cluster.pods[0]["spec"]["containers"][0]["env"]}
    assert env["KUBEFORGE_PEERS_FILE"] == "/etc/kubeforge/peers.json"
