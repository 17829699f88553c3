"""kubeforge_operator.stuck: which pods are stuck and why, from the pod JSON the API server sends."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubeforge_operator import stuck
from kubeforge_operator.reconcile import PodView
from kubernetes.client.exceptions import ApiException

IMAGE = "kubeforge/runtime:0.1.0-abc"


def _pod(
    *,
    phase: str = "Pending",
    waiting: tuple[str, str] | None = None,
    init_waiting: tuple[str, str] | None = None,
    scheduled: tuple[str, str, str] | None = None,
    gates: bool = False,
    deleting: bool = False,
) -> dict[str, Any]:
    """A job pod as the API server sends it, with the states the kubelet and scheduler write."""
    status: dict[str, Any] = {"phase": phase, "conditions": []}
    if waiting:
        status["containerStatuses"] = [
            {"name": "generator", "image": IMAGE, "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}
        ]
    if init_waiting:
        status["initContainerStatuses"] = [
            {"name": "fetch", "image": "init:1", "state": {"waiting": {"reason": init_waiting[0]}}}
        ]
    if scheduled:
        status["conditions"].append(
            {"type": "PodScheduled", "status": scheduled[0], "reason": scheduled[1], "message": scheduled[2]}
        )
    meta: dict[str, Any] = {
        "name": "grpo-generator-0",
        "labels": {"kubeforge.dev/role": "generator", "kubeforge.dev/replica": "0"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"containers": [{"name": "generator", "image": IMAGE}]}
    if gates:
        spec["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    return {"metadata": meta, "spec": spec, "status": status}


UNSCHEDULABLE = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
PULL = f'Back-off pulling image "{IMAGE}"'
NEVER = "Container image is not present with pull policy of Never"

# (case, pod, expected (reason, image, message) or None)
CASES = [
    ("image never pulled", _pod(waiting=("ErrImageNeverPull", NEVER)), ("ErrImageNeverPull", IMAGE, NEVER)),
    ("pull back-off", _pod(waiting=("ImagePullBackOff", PULL)), ("ImagePullBackOff", IMAGE, PULL)),
    ("pull error", _pod(waiting=("ErrImagePull", "manifest unknown")), ("ErrImagePull", IMAGE, "manifest unknown")),
    ("invalid image name", _pod(waiting=("InvalidImageName", "couldn't parse image")),
     ("InvalidImageName", IMAGE, "couldn't parse image")),
    ("missing secret key", _pod(waiting=("CreateContainerConfigError", 'secret "grpo-token" not found')),
     ("CreateContainerConfigError", IMAGE, 'secret "grpo-token" not found')),
    ("create container error", _pod(waiting=("CreateContainerError", "no such file")),
     ("CreateContainerError", IMAGE, "no such file")),
    ("run container error", _pod(waiting=("RunContainerError", "exec: python: not found")),
     ("RunContainerError", IMAGE, "exec: python: not found")),
    ("crash loop", _pod(phase="Running", waiting=("CrashLoopBackOff", "back-off 5m0s")),
     ("CrashLoopBackOff", IMAGE, "back-off 5m0s")),
    ("init container first", _pod(waiting=("PodInitializing", ""), init_waiting=("ImagePullBackOff", "")),
     ("ImagePullBackOff", "init:1", "")),
    ("unschedulable", _pod(scheduled=("False", "Unschedulable", UNSCHEDULABLE)), ("Unschedulable", "", UNSCHEDULABLE)),
    ("image before scheduling", _pod(waiting=("ErrImagePull", "x"), scheduled=("False", "Unschedulable", "y")),
     ("ErrImagePull", IMAGE, "x")),
    # Normal progress, or not ours to report.
    ("creating", _pod(waiting=("ContainerCreating", "")), None),
    ("initializing", _pod(waiting=("PodInitializing", "")), None),
    ("scheduled", _pod(scheduled=("True", "", "")), None),
    ("just created", _pod(), None),
    ("queued at a scheduling gate", _pod(gates=True, scheduled=("False", "SchedulingGated", "gated")), None),
    ("gated but its image fails", _pod(gates=True, waiting=("ErrImagePull", "x")), ("ErrImagePull", IMAGE, "x")),
    ("being deleted", _pod(deleting=True, waiting=("ImagePullBackOff", PULL)), None),
    ("failed: the failure policy's", _pod(phase="Failed", waiting=("ImagePullBackOff", PULL)), None),
]  # fmt: skip


@pytest.mark.parametrize(("pod", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diagnose_pod(pod: dict[str, Any], expected: tuple[str, str, str] | None) -> None:
    got = stuck.diagnose_pod(pod)
    if expected is None:
        assert got is None
        return
    assert got is not None and (got.pod, got.reason, got.image, got.message) == ("grpo-generator-0", *expected)
    assert got.describe().startswith(f"grpo-generator-0: {expected[0]}")
    assert PodView.of(pod).diagnosis == got  # the reconciler reads the same


def test_diagnose_takes_the_first_stuck_pod_in_the_order_given() -> None:
    fine, first, second = _pod(), _pod(waiting=("ErrImagePull", "a")), _pod(scheduled=("False", "Unschedulable", "b"))
    second["metadata"]["name"] = "grpo-trainer-0"
    assert stuck.diagnose([fine, first, second]).reason == "ErrImagePull"
    assert stuck.diagnose([second, first]).pod == "grpo-trainer-0"
    assert stuck.diagnose([fine]) is None


def test_long_messages_are_cut() -> None:
    got = stuck.diagnose_pod(_pod(waiting=("ErrImagePull", "x" * 5000)))
    assert got is not None and len(got.message) == stuck.MAX_MESSAGE and got.message.endswith("...")


def _api_error(code: int, reason: str, body: Any) -> ApiException:
    error = ApiException(status=code, reason=reason)
    error.body = json.dumps(body) if isinstance(body, dict) else body
    return error


QUOTA = 'pods "grpo-trainer-0" is forbidden: exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0'
RESTRICTED = 'pods "grpo-trainer-0" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true'
INVALID = 'Pod "grpo-trainer-0" is invalid: spec.containers[0].image: Required value'

# (case, kind, error, expected (pod, reason, message) or None: transient, raised as before)
REFUSALS = [
    ("quota", "Pod", _api_error(403, "Forbidden", {"kind": "Status", "reason": "Forbidden", "message": QUOTA}),
     ("grpo-trainer-0", "CreateForbidden", f"refused by the API server (403): {QUOTA}")),
    ("pod security", "Pod", _api_error(403, "Forbidden", {"reason": "Forbidden", "message": RESTRICTED}),
     ("grpo-trainer-0", "CreateForbidden", f"refused by the API server (403): {RESTRICTED}")),
    ("invalid", "Pod", _api_error(422, "Unprocessable Entity", {"reason": "Invalid", "message": INVALID}),
     ("grpo-trainer-0", "CreateInvalid", f"refused by the API server (422): {INVALID}")),
    ("not JSON", "Pod", _api_error(400, "Bad Request", "garbage"),
     ("grpo-trainer-0", "CreateBadRequest", "refused by the API server (400): garbage")),
    ("another kind", "ConfigMap", _api_error(403, "Forbidden", {"reason": "Forbidden", "message": "quota"}),
     ("ConfigMap grpo-trainer-0", "CreateForbidden", "refused by the API server (403): quota")),
    ("server error", "Pod", _api_error(500, "Internal Server Error", {"message": "etcd"}), None),
    ("throttled", "Pod", _api_error(429, "Too Many Requests", {"message": "slow down"}), None),
    ("exists", "Pod", _api_error(409, "Conflict", {"message": "already exists"}), None),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "error", "expected"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refused(kind: str, error: ApiException, expected: tuple[str, str, str] | None) -> None:
    got = stuck.refused(kind, "grpo-trainer-0", error)
    assert (got and (got.pod, got.reason, got.message)) == expected


# (case, previous status.stuck, now stuck (pod, reason) or None, Event due)
CHANGES = [
    ("first seen", None, ("grpo-generator-0", "ImagePullBackOff"), True),
    ("same again", ("grpo-generator-0", "ImagePullBackOff"), ("grpo-generator-0", "ImagePullBackOff"), False),
    ("pull retried", ("grpo-generator-0", "ImagePullBackOff"), ("grpo-generator-0", "ErrImagePull"), False),
    ("back-off again", ("grpo-generator-0", "ErrImagePull"), ("grpo-generator-0", "ImagePullBackOff"), False),
    ("another reason", ("grpo-generator-0", "ErrImagePull"), ("grpo-generator-0", "CreateContainerConfigError"), True),
    ("another pod", ("grpo-generator-0", "Unschedulable"), ("grpo-trainer-0", "Unschedulable"), True),
]


@pytest.mark.parametrize(("previous", "current", "due"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_an_event_is_due_only_when_the_stuck_state_changes(
    previous: tuple[str, str] | None, current: tuple[str, str], due: bool
) -> None:
    before = stuck.Diagnosis(*previous, message="m", image=IMAGE).as_status() if previous else None
    assert stuck.event_due(before, stuck.Diagnosis(*current, message="other")) is due
