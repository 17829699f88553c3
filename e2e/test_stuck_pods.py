"""Pods that do not start, on a real control plane: named in status and in one Event within 60 s,
and failed at the startup deadline with nothing left running (kubeforge_operator.stuck, .startup)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cluster import Operator, wait_for
from kubernetes import client
from test_operator import JOB, active_pods, create, job_body, pods, running, status

pytestmark = pytest.mark.cluster

# Named within this long (issue 15: "within 60 s").
NAMED_WITHIN = 60
# Longer than the reconcile loop's resync (handlers.RESYNC_SECONDS): at least one more pass runs.
ANOTHER_PASS = 12
# One trainer pod asks for more GPUs than any KWOK node has (8); no capacity gate, so it is created.
TOO_BIG = {
    "roles": {**JOB["spec"]["roles"], "trainer": {"nodes": 1, "gpusPerNode": 16}},
    "scheduling": {"gang": "off"},
}


def stuck(namespace: str, job: str = "grpo") -> dict[str, Any]:
    return status(namespace, job).get("stuck") or {}


def condition(namespace: str, type_: str, job: str = "grpo") -> dict[str, Any]:
    return next((c for c in status(namespace, job).get("conditions") or [] if c["type"] == type_), {})


def events(namespace: str, reason: str, job: str = "grpo") -> list[client.CoreV1Event]:
    selector = f"involvedObject.name={job},reason={reason}"
    return client.CoreV1Api().list_namespaced_event(namespace, field_selector=selector).items


def test_a_create_refused_by_admission_is_named_with_the_api_message(namespace: str, operator: Operator) -> None:
    core = client.CoreV1Api()
    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    # Admission refuses every pod either way; wait for the quota controller so the refusal is the quota's.
    wait_for("quota counted", lambda: core.read_namespaced_resource_quota("no-pods", namespace).status.used or {})
    create(namespace, job_body())
    got = wait_for(
        "the refusal in status",
        lambda: (s := stuck(namespace)).get("reason") == "CreateForbidden" and s,
        timeout=NAMED_WITHIN,
        operator=operator,
    )
    assert got["pod"] == "grpo-trainer-0"
    assert "exceeded quota: no-pods" in got["message"] and "(403)" in got["message"]
    st = status(namespace, "grpo")
    assert st["phase"] == "Starting"
    assert "grpo-trainer-0: CreateForbidden" in st["message"] and "exceeded quota" in st["message"]
    assert condition(namespace, "Stuck")["status"] == "True"
    assert condition(namespace, "Stuck")["reason"] == "CreateForbidden"
    wait_for("the Event", lambda: events(namespace, "CreateForbidden"), operator=operator)
    [event] = events(namespace, "CreateForbidden")
    assert event.type == "Warning" and "grpo-trainer-0" in event.message and "exceeded quota" in event.message

    time.sleep(ANOTHER_PASS)  # refused again on every pass: still one Event
    assert len(events(namespace, "CreateForbidden")) == 1
    core.delete_namespaced_resource_quota("no-pods", namespace)
    wait_for("phase Running once the quota is gone", lambda: running(namespace), timeout=90, operator=operator)
    assert not stuck(namespace)
    assert condition(namespace, "Stuck")["status"] == "False"


def test_an_unschedulable_pod_is_named_with_the_schedulers_message(namespace: str, operator: Operator) -> None:
    create(namespace, job_body(**TOO_BIG))
    got = wait_for(
        "Unschedulable in status",
        lambda: (s := stuck(namespace)).get("reason") == "Unschedulable" and s,
        timeout=NAMED_WITHIN,
        operator=operator,
    )
    assert got["pod"] == "grpo-trainer-0"
    assert "Insufficient nvidia.com/gpu" in got["message"]
    assert "grpo-trainer-0: Unschedulable" in status(namespace, "grpo")["message"]
    assert condition(namespace, "Stuck")["reason"] == "Unschedulable"
    wait_for("the Event", lambda: events(namespace, "Unschedulable"), operator=operator)
    time.sleep(ANOTHER_PASS)
    [event] = events(namespace, "Unschedulable")
    assert "grpo-trainer-0" in event.message and "Insufficient nvidia.com/gpu" in event.message


def test_a_container_that_cannot_start_is_named_with_its_image(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    # KWOK runs no kubelet: write what a kubelet writes for a container whose Secret key is missing.
    # (KWOK's stages leave a Running pod alone; the real-node tier pulls a bad image for real.)
    pod = pods(namespace)["generator-0"]
    image = pod.spec.containers[0].image
    client.CoreV1Api().patch_namespaced_pod_status(
        "grpo-generator-0",
        namespace,
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
                "containerStatuses": [
                    {
                        "name": "generator",
                        "image": image,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": 'secret "grpo-extra" not found',
                            }
                        },
                    }
                ],
            }
        },
    )
    got = wait_for(
        "CreateContainerConfigError in status",
        lambda: (s := stuck(namespace)).get("reason") == "CreateContainerConfigError" and s,
        timeout=NAMED_WITHIN,
        operator=operator,
    )
    assert got == {
        "pod": "grpo-generator-0",
        "reason": "CreateContainerConfigError",
        "message": 'secret "grpo-extra" not found',
        "image": image,
    }
    assert f"grpo-generator-0: CreateContainerConfigError (image {image})" in status(namespace, "grpo")["message"]
    wait_for("the Event", lambda: events(namespace, "CreateContainerConfigError"), operator=operator)


def test_the_startup_deadline_fails_the_job_and_deletes_its_pods(namespace: str, operator: Operator) -> None:
    create(namespace, job_body(startupDeadlineSeconds=8, **TOO_BIG))
    wait_for("some pods", lambda: pods(namespace), operator=operator)
    st = wait_for(
        "phase Failed",
        lambda: (s := status(namespace, "grpo")).get("phase") == "Failed" and s,
        timeout=60,
        operator=operator,
    )
    assert "startupDeadlineSeconds (8 s) passed with" in st["message"]
    assert "grpo-trainer-0 (Unschedulable: 0/" in st["message"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["message"] == st["message"]
    wait_for("no pod left", lambda: not pods(namespace), timeout=60, operator=operator)
    time.sleep(3)  # a terminal job never gets its pods back
    assert not active_pods(namespace) and status(namespace, "grpo")["phase"] == "Failed"
