"""The operator on a real control plane: RLJob in, pods out, status back, failures handled."""

from __future__ import annotations

import base64
import copy
import json
import time
from typing import Any

import httpx
import pytest
from cluster import GROUP, PLURAL, VERSION, Operator, wait_for
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from storage import instant_storage_class

pytestmark = pytest.mark.cluster

JOB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "RLJob",
    "metadata": {"name": "grpo"},
    "spec": {
        "model": {"path": "/models/qwen3-1.7b"},
        "steps": 10,
        "roles": {
            "trainer": {"nodes": 2, "gpusPerNode": 4, "cpu": 8, "memory": "64Gi"},
            "generator": {"replicas": 2, "gpus": 1},
            "reward": {"replicas": 1},
        },
        "failurePolicy": {"maxRestarts": 2},
    },
}
PODS = ["trainer-0", "trainer-1", "generator-0", "generator-1", "reward-0", "controller-0"]


def job_body(name: str = "grpo", **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(JOB)
    # The claim of the run directory binds at once on the KWOK nodes (storage.py); two trainer pods share it.
    body["spec"]["checkpoint"] = {
        "storage": {"storageClassName": instant_storage_class(), "accessMode": "ReadWriteMany"}
    }
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    return body


def create(namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    return client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get(namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def patch_spec(namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi().patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})


def status(namespace: str, name: str) -> dict[str, Any]:
    return get(namespace, name).get("status") or {}


def pods(namespace: str, job: str = "grpo") -> dict[str, client.V1Pod]:
    listed = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"kubeforge.dev/job={job}").items
    return {p.metadata.name.removeprefix(f"{job}-"): p for p in listed if p.metadata.deletion_timestamp is None}


def active_pods(namespace: str, job: str = "grpo") -> set[str]:
    """Pods that hold resources: neither finished nor being deleted."""
    return {n for n, p in pods(namespace, job).items() if p.status.phase not in ("Succeeded", "Failed")}


def uid(namespace: str, pod: str) -> str | None:
    found = pods(namespace).get(pod)
    return found.metadata.uid if found else None


def running(namespace: str, job: str = "grpo") -> bool:
    return status(namespace, job).get("phase") == "Running"


def fail_pod(namespace: str, pod: str, exit_code: int = 1, reason: str = "Error") -> None:
    """Make KWOK end this pod as Failed, as if its container exited with `exit_code`."""
    client.CoreV1Api().patch_namespaced_pod(
        pod,
        namespace,
        {
            "metadata": {
                "labels": {"kwok.kubeforge.dev/fail": "true"},
                "annotations": {"kwok.kubeforge.dev/exit-code": str(exit_code), "kwok.kubeforge.dev/reason": reason},
            }
        },
    )


def table_row(namespace: str, name: str) -> dict[str, Any]:
    """What `kubectl get rlj` prints: the server-side table with the printer columns."""
    api = client.ApiClient()
    request = api.param_serialize(
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
    )
    response = json.loads(api.call_api(*request).read())
    columns = [c["name"] for c in response["columnDefinitions"]]
    return dict(zip(columns, response["rows"][0]["cells"], strict=True))


def test_a_job_becomes_running_with_every_pod_and_readable_status(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    found = pods(namespace)
    assert sorted(found) == sorted(PODS)
    st = status(namespace, "grpo")
    assert st["roles"] == {
        "trainer": {"ready": 2, "total": 2},
        "generator": {"ready": 2, "total": 2},
        "reward": {"ready": 1, "total": 1},
        "controller": {"ready": 1, "total": 1},
    }
    assert st["restarts"] == 0 and st["startTime"]
    assert {c["type"]: c["status"] for c in st["conditions"]}.items() >= {
        "SpecValid": "True",
        "Scheduled": "True",
    }.items()
    assert table_row(namespace, "grpo")["Phase"] == "Running"

    trainer1 = found["trainer-1"]
    env = {e.name: e.value for e in trainer1.spec.containers[0].env}
    assert env["KUBEFORGE_ROLE"] == "trainer" and env["KUBEFORGE_REPLICA"] == "1"
    assert env["PET_NODE_RANK"] == "1" and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_MASTER_ADDR"] == f"grpo-trainer-0.grpo.{namespace}.svc"
    assert env["KUBEFORGE_GENERATOR_URLS"].count(f".grpo.{namespace}.svc:8000") == 2
    # The tokens are files from the job's Secret, each role's own keys only; none is in the environment.
    assert env["KUBEFORGE_TOKEN_DIR"] == "/var/run/kubeforge/tokens"
    assert not any(e.value_from for e in trainer1.spec.containers[0].env)
    tokens = next(v for v in trainer1.spec.volumes if v.name == "tokens").secret
    assert tokens.secret_name == f"grpo-token-{get(namespace, 'grpo')['metadata']['uid'][:8]}"
    assert sorted(item.key for item in tokens.items) == ["digests.json", "job", "trainer"]
    controller = found["controller-0"]
    tokens = next(v for v in controller.spec.volumes if v.name == "tokens").secret
    assert sorted(item.key for item in tokens.items) == ["controller", "digests.json", "job"]
    assert trainer1.spec.containers[0].resources.limits["nvidia.com/gpu"] == "4"
    assert trainer1.spec.node_name, "the scheduler placed the pod"
    assert trainer1.metadata.owner_references[0].kind == "RLJob"

    core = client.CoreV1Api()
    service = core.read_namespaced_service("grpo", namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    assert "spec.json" in core.read_namespaced_config_map("grpo-spec", namespace).data
    assert client.NetworkingV1Api().read_namespaced_network_policy("grpo-same-job", namespace)
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=grpo").items
    assert {"Starting", "Running"} <= {e.reason for e in events}


def test_a_lost_generator_pod_is_replaced_alone_and_counted(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    before = {name: p.metadata.uid for name, p in pods(namespace).items()}
    fail_pod(namespace, "grpo-generator-1")
    wait_for(
        "generator-1 replaced",
        lambda: uid(namespace, "generator-1") not in (None, before["generator-1"]),
        operator=operator,
    )
    wait_for("phase Running again", lambda: running(namespace), operator=operator)
    after = {name: p.metadata.uid for name, p in pods(namespace).items()}
    assert {n for n in PODS if after[n] != before[n]} == {"generator-1"}
    st = status(namespace, "grpo")
    assert st["restarts"] == 1 and st["restartsByRole"] == {"generator": 1}
    assert pods(namespace)["generator-1"].metadata.labels["kubeforge.dev/restart-generation"] == "1"
    assert table_row(namespace, "grpo")["Restarts"] == 1


def test_a_failed_trainer_restarts_the_group_then_fails_when_the_budget_is_spent(
    namespace: str, operator: Operator
) -> None:
    create(namespace, job_body(failurePolicy={"maxRestarts": 1}))
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    before = {name: p.metadata.uid for name, p in pods(namespace).items()}
    fail_pod(namespace, "grpo-trainer-0", exit_code=137)  # killed (SIGKILL), no error of its own
    wait_for("trainer group restarted", lambda: status(namespace, "grpo").get("restarts") == 1, operator=operator)
    wait_for("phase Running again", lambda: running(namespace), timeout=90, operator=operator)
    after = {name: p.metadata.uid for name, p in pods(namespace).items()}
    assert {n for n in PODS if after[n] != before[n]} == {"trainer-0", "trainer-1", "controller-0"}

    fail_pod(namespace, "grpo-generator-0")
    st = wait_for(
        "phase Failed", lambda: (s := status(namespace, "grpo")).get("phase") == "Failed" and s, operator=operator
    )
    assert "restart budget exhausted (1 of 1 used)" in st["message"] and "grpo-generator-0 failed" in st["message"]
    wait_for("every pod stopped", lambda: not active_pods(namespace), operator=operator)
    left = set(pods(namespace))  # failed pods stay for their logs
    time.sleep(3)  # a terminal job never gets children back
    assert set(pods(namespace)) == left and not active_pods(namespace)
    assert status(namespace, "grpo")["phase"] == "Failed"


def test_suspend_deletes_pods_and_resume_recreates_them(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    patch_spec(namespace, "grpo", {"suspend": True})
    wait_for("phase Suspended", lambda: status(namespace, "grpo").get("phase") == "Suspended", operator=operator)
    wait_for("no pods", lambda: not pods(namespace), operator=operator)
    patch_spec(namespace, "grpo", {"suspend": False})
    wait_for("phase Running after resume", lambda: running(namespace), timeout=90, operator=operator)
    assert sorted(pods(namespace)) == sorted(PODS)


def test_controller_success_ends_the_job_and_stops_the_rest(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    client.CoreV1Api().patch_namespaced_pod(
        "grpo-controller-0", namespace, {"metadata": {"labels": {"kwok.kubeforge.dev/succeed": "true"}}}
    )
    st = wait_for(
        "phase Succeeded", lambda: (s := status(namespace, "grpo")).get("phase") == "Succeeded" and s, operator=operator
    )
    assert st["completionTime"]
    wait_for("other pods stopped", lambda: not active_pods(namespace), operator=operator)


def test_deleting_a_job_garbage_collects_every_child(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "grpo")
    core = client.CoreV1Api()
    wait_for("pods collected", lambda: not pods(namespace), timeout=90, operator=operator)
    wait_for(
        "services collected",
        lambda: not core.list_namespaced_service(namespace, label_selector="kubeforge.dev/job=grpo").items,
        timeout=90,
    )
    wait_for(
        "config map collected",
        lambda: not core.list_namespaced_config_map(namespace, label_selector="kubeforge.dev/job=grpo").items,
        timeout=90,
    )


def test_a_job_that_does_not_fit_waits_without_creating_pods(namespace: str, operator: Operator) -> None:
    create(namespace, job_body(roles={"trainer": {"nodes": 3, "gpusPerNode": 8}}))
    st = wait_for(
        "phase Pending", lambda: (s := status(namespace, "grpo")).get("phase") == "Pending" and s, operator=operator
    )
    scheduled = next(c for c in st["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"] == "InsufficientGPUs"
    assert "needs 24 GPUs" in scheduled["message"]
    time.sleep(2)
    assert not pods(namespace)


def test_killing_the_operator_mid_reconcile_creates_no_duplicates(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("first pods", lambda: pods(namespace), operator=operator)
    operator.kill()
    operator.start()
    wait_for("phase Running", lambda: running(namespace), timeout=90, operator=operator)
    listed = client.CoreV1Api().list_namespaced_pod(namespace, label_selector="kubeforge.dev/job=grpo").items
    assert sorted(p.metadata.name for p in listed) == sorted(f"grpo-{n}" for n in PODS)


# (spec changes, the field the refusal must name). The API server refuses the first group at
# create time from the CRD schema; the rest pass the schema and the operator refuses them.
REFUSED_BY_API_SERVER = [
    ({"steps": "many"}, "spec.steps"),
    ({"steps": 0}, "spec.steps"),
    ({"mode": "eager"}, "spec.mode"),
    ({"roles": {"generator": {"replicas": -1}}}, "spec.roles.generator.replicas"),
    ({"roles": {"trainer": {"cpu": "lots"}}}, "spec.roles.trainer.cpu"),
    ({"roles": {"genrator": {"replicas": 2}}}, "spec.roles.genrator"),
    ({"scheduling": {"gang": "yes"}}, "spec.scheduling.gang"),
    ({"failurePolicy": {"rules": [{"role": "generator", "action": "Retry"}]}}, "spec.failurePolicy.rules[0].action"),
]
REFUSED_BY_OPERATOR = [
    ({"maxStaleness": 2}, "spec: got"),
    ({"model": {"path": "hf://Qwen/Qwen3-1.7B"}}, "spec.model.path"),
    ({"roles": {"generator": {"gpus": 2, "tensorParallel": 4}}}, "spec.roles.generator"),
    ({"roles": {"trainer": {"nodes": 3, "tensorParallel": 2}}}, "spec.roles.trainer"),
    ({"scheduling": {"gang": "kueue"}}, "spec.scheduling"),
    ({"scheduling": {"tolerations": [{"operator": "Exists", "value": "x"}]}}, "spec.scheduling.tolerations[0]"),
    ({"failurePolicy": {"rules": [{"role": "trainer", "action": "RestartPod"}]}}, "spec.failurePolicy.rules[0]"),
    ({"env": {"KUBEFORGE_ROLE": "x"}}, "spec.env"),
]


def test_invalid_specs_are_refused_with_the_field_and_create_nothing(namespace: str, operator: Operator) -> None:
    custom = client.CustomObjectsApi()
    for n, (change, field) in enumerate(REFUSED_BY_API_SERVER):
        body = job_body(f"bad-api-{n}", **change)
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict")
        assert refused.value.status in (400, 422), change
        assert field in refused.value.body, (change, refused.value.body)
    for n, (change, _) in enumerate(REFUSED_BY_OPERATOR):
        create(namespace, job_body(f"bad-op-{n}", **change))
    for n, (change, field) in enumerate(REFUSED_BY_OPERATOR):
        name = f"bad-op-{n}"
        st = wait_for(
            f"{name} refused",
            lambda name=name: (s := status(namespace, name)).get("phase") == "Failed" and s,
            operator=operator,
        )
        valid = next(c for c in st["conditions"] if c["type"] == "SpecValid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec" and field in valid["message"], (
            change,
            valid,
        )
        assert field in st["message"]
    assert not client.CoreV1Api().list_namespaced_pod(namespace).items
    events = client.CoreV1Api().list_namespaced_event(namespace, field_selector="reason=Failed,type=Warning").items
    assert {e.involved_object.name for e in events} == {f"bad-op-{n}" for n in range(len(REFUSED_BY_OPERATOR))}


def test_progress_pushed_by_the_controller_lands_in_status(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    controller_env = {e.name: e.value for e in pods(namespace)["controller-0"].spec.containers[0].env}
    url = controller_env["KUBEFORGE_PROGRESS_URL"]
    assert url == f"http://127.0.0.1:{operator.progress_port}/progress/{namespace}/grpo"
    secret = client.CoreV1Api().read_namespaced_secret(token_secret(namespace), namespace)
    token = base64.b64decode(secret.data["controller"]).decode()
    report = {"step": 7, "policyVersion": 7, "rewardMean": 0.5, "weightSyncSeconds": 0.02}
    assert httpx.post(url, json=report, headers={"Authorization": "Bearer wrong"}).status_code == 401
    job_token = base64.b64decode(secret.data["job"]).decode()  # every pod holds it: not enough to report
    assert httpx.post(url, json=report, headers={"Authorization": f"Bearer {job_token}"}).status_code == 401
    assert httpx.post(url, json={"step": "x"}, headers={"Authorization": f"Bearer {token}"}).status_code == 400
    assert httpx.post(url, json=report, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    progress = status(namespace, "grpo")["progress"]
    assert progress["step"] == 7 and progress["rewardMean"] == 0.5 and progress["updatedAt"]
    row = table_row(namespace, "grpo")
    assert (row["Step"], row["Reward"]) == (7, 0.5)


def token_secret(namespace: str, name: str = "grpo") -> str:
    return f"{name}-token-{get(namespace, name)['metadata']['uid'][:8]}"


def test_a_foreign_spec_is_refused_and_a_re_created_job_gets_a_token_of_its_own(
    namespace: str, operator: Operator
) -> None:
    # Issue 16, item 12: a <job>-spec this RLJob does not own is refused, and nothing is created.
    core = client.CoreV1Api()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "grpo-spec"}, "data": {"spec.json": "{}"}})
    # A Secret under the job's token name before the uid was in it: never used (item 19: never even read).
    core.create_namespaced_secret(namespace, {"metadata": {"name": "grpo-token"}, "stringData": {"job": "planted"}})
    create(namespace, job_body())
    wait_for(
        "ForeignObject in status",
        lambda: (status(namespace, "grpo").get("stuck") or {}).get("reason") == "ForeignObject",
        operator=operator,
    )
    assert status(namespace, "grpo")["stuck"]["pod"] == "ConfigMap grpo-spec"
    assert not pods(namespace)
    assert not core.list_namespaced_secret(namespace, label_selector="kubeforge.dev/job=grpo").items
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=grpo").items
    assert any(e.reason == "ForeignObject" and "grpo-spec" in e.message for e in events)
    url = f"http://127.0.0.1:{operator.progress_port}/progress/{namespace}/grpo"
    report = {"step": 1}
    assert httpx.post(url, json=report, headers={"Authorization": "Bearer planted"}).status_code == 401
    core.delete_namespaced_config_map("grpo-spec", namespace)
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    volumes = [v.secret for p in pods(namespace).values() for v in p.spec.volumes if v.name == "tokens"]
    assert {v.secret_name for v in volumes} == {token_secret(namespace)}

    # Item 14: deleted and re-created under the same name, the new job's token works and the old one not.
    def token() -> str:
        secret = core.read_namespaced_secret(token_secret(namespace), namespace)
        return base64.b64decode(secret.data["controller"]).decode()

    old = token()
    assert httpx.post(url, json=report, headers={"Authorization": f"Bearer {old}"}).status_code == 200
    first_uid = get(namespace, "grpo")["metadata"]["uid"]
    client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "grpo")
    wait_for(
        "job gone",
        lambda: not client.CustomObjectsApi().list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
        timeout=90,
        operator=operator,
    )
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), timeout=120, operator=operator)
    assert get(namespace, "grpo")["metadata"]["uid"] != first_uid
    new = token()
    assert new != old
    assert httpx.post(url, json=report, headers={"Authorization": f"Bearer {new}"}).status_code == 200
    assert httpx.post(url, json=report, headers={"Authorization": f"Bearer {old}"}).status_code == 401


def test_scaling_generators_down_removes_the_extra_pod(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    patch_spec(namespace, "grpo", {"roles": {"generator": {"replicas": 1}}})
    wait_for("generator-1 gone", lambda: "generator-1" not in pods(namespace), operator=operator)
    wait_for(
        "totals follow the spec",
        lambda: status(namespace, "grpo")["roles"]["generator"] == {"ready": 1, "total": 1},
        operator=operator,
    )
    # Issue 16, item 13: the spec the running pods read follows the edit, peers included.
    config = client.CoreV1Api().read_namespaced_config_map("grpo-spec", namespace).data
    assert json.loads(config["spec.json"])["roles"]["generator"]["replicas"] == 1
    assert [u.split(".")[0] for u in json.loads(config["peers.json"])["generator"]] == ["http://grpo-generator-0"]
    assert status(namespace, "grpo")["observedGeneration"] == get(namespace, "grpo")["metadata"]["generation"]


# (what is edited, the patch, the field the refusal names): fields a running job could not follow.
IMMUTABLE_EDITS = [
    ("model", {"model": {"path": "/models/other"}}, "spec.model"),
    ("trainer nodes", {"roles": {"trainer": {"nodes": 3}}}, "spec.roles.trainer"),
    ("generator GPUs", {"roles": {"generator": {"gpus": 2}}}, "spec.roles.generator.gpus"),
    ("image", {"image": "kubeforge/runtime-cpu:other"}, "spec.image"),
    ("steps", {"steps": 7}, "spec.steps"),
    ("algorithm", {"algorithm": {"lr": 0.5}}, "spec.algorithm"),
    ("step deadline", {"stepDeadlineSeconds": 60}, "spec.stepDeadlineSeconds"),
]
# Edits the operator applies to a running job; the last writes out values it had or defaults, no change.
MUTABLE_EDITS = [
    {"suspend": False},
    {"activeDeadlineSeconds": 86400, "startupDeadlineSeconds": 900, "ttlSecondsAfterFinished": 60},
    {"failurePolicy": {"maxRestarts": 9}},
    {"roles": {"generator": {"replicas": 3}}},
    {"steps": 10, "stepDeadlineSeconds": 3600, "roles": {"generator": {"gpus": 1, "tensorParallel": 1}}},
]


def test_fields_a_running_job_cannot_follow_are_immutable_with_a_message(namespace: str) -> None:
    create(namespace, job_body(name="frozen"))
    before = get(namespace, "frozen")["spec"]
    for case, patch, field in IMMUTABLE_EDITS:
        with pytest.raises(ApiException) as refused:
            patch_spec(namespace, "frozen", patch)
        assert refused.value.status == 422, case
        message = json.loads(refused.value.body)["message"]
        assert f"{field} cannot change" in message and "delete and re-create" in message, (case, message)
    assert get(namespace, "frozen")["spec"] == before  # nothing changed
    for patch in MUTABLE_EDITS:
        patch_spec(namespace, "frozen", patch)
    assert get(namespace, "frozen")["spec"]["roles"]["generator"]["replicas"] == 3


def test_kueue_gang_labels_every_pod_with_its_group(namespace: str, operator: Operator) -> None:
    create(namespace, job_body(scheduling={"gang": "kueue", "queue": "team-a"}))
    wait_for("all pods", lambda: len(pods(namespace)) == len(PODS), operator=operator)
    for pod in pods(namespace).values():
        assert pod.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert pod.metadata.labels["kueue.x-k8s.io/pod-group-name"] == "grpo"
        assert pod.metadata.annotations["kueue.x-k8s.io/pod-group-total-count"] == str(len(PODS))


def test_a_gang_scheduler_that_is_not_installed_is_named_and_no_pod_starts(namespace: str, operator: Operator) -> None:
    create(namespace, job_body(scheduling={"gang": "coscheduling", "schedulerName": "scheduler-plugins"}))
    st = wait_for(
        "phase Pending", lambda: (s := status(namespace, "grpo")).get("phase") == "Pending" and s, operator=operator
    )
    assert "no podgroups.scheduling.x-k8s.io resource" in st["message"]
    time.sleep(2)
    assert not pods(namespace)


def test_deadline_fails_the_job_and_ttl_deletes_it(namespace: str, operator: Operator) -> None:
    # The TTL leaves the test time to see the phase before the job goes, on a loaded machine too.
    create(namespace, job_body(activeDeadlineSeconds=2, ttlSecondsAfterFinished=8))
    st = wait_for(
        "phase Failed",
        lambda: (s := status(namespace, "grpo")).get("phase") == "Failed" and s,
        timeout=60,
        operator=operator,
    )
    assert "activeDeadlineSeconds (2 s) exceeded" in st["message"]

    def gone() -> bool:
        try:
            get(namespace, "grpo")
        except ApiException as e:
            return e.status == 404
        return False

    wait_for("the job deleted after its TTL", gone, timeout=60, operator=operator)


def test_operator_metrics_count_pods_and_phases(namespace: str, operator: Operator) -> None:
    create(namespace, job_body())
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    text = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics").text
    assert f'kubeforge_operator_pods_created_total{{job="grpo",namespace="{namespace}",role="generator"}} 2.0' in text
    assert f'kubeforge_operator_jobs{{namespace="{namespace}",phase="Running"}} 1.0' in text
    assert "kubeforge_operator_reconcile_seconds_count" in text


@pytest.mark.parametrize("when_deleted", ["Retain", "Delete"])
def test_pod_security_restricted_admits_every_pod_and_the_checkpoint_claim_follows_when_deleted(
    namespace: str, operator: Operator, when_deleted: str
) -> None:
    core = client.CoreV1Api()
    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    body = job_body()
    body["spec"]["checkpoint"]["storage"]["whenDeleted"] = when_deleted
    created = create(namespace, body)
    # The API server's PodSecurity admission refuses a pod that is not "restricted" (403): every pod exists.
    wait_for("phase Running", lambda: running(namespace), operator=operator)
    assert sorted(pods(namespace)) == sorted(PODS)
    assert not status(namespace, "grpo").get("stuck")

    claim_name = f"grpo-checkpoints-{created['metadata']['uid'][:8]}"
    claim = core.read_namespaced_persistent_volume_claim(claim_name, namespace)
    assert claim.status.phase == "Bound" and claim.spec.access_modes == ["ReadWriteMany"]
    for name, pod in pods(namespace).items():
        claims = {v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
        assert claims == ({claim_name} if name.split("-")[0] in ("trainer", "controller") else set()), name

    client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "grpo")
    wait_for("pods collected", lambda: not pods(namespace), timeout=90, operator=operator)

    def claim_gone() -> bool:
        try:
            core.read_namespaced_persistent_volume_claim(claim_name, namespace)
        except ApiException as e:
            return e.status == 404
        return False

    if when_deleted == "Delete":
        wait_for("the claim collected with its RLJob", claim_gone, timeout=90)
    else:
        time.sleep(5)  # the garbage collector has had its chance: the claim has no owner to follow
        assert (
            not claim_gone()
            and not core.read_namespaced_persistent_volume_claim(claim_name, namespace).metadata.owner_references
        )


def test_a_job_whose_checkpoints_would_die_with_a_pod_is_refused_and_creates_nothing(
    namespace: str, operator: Operator
) -> None:
    body = job_body()
    body["spec"]["checkpoint"] = {"storage": {"emptyDir": True}}  # the default rules restart from a checkpoint
    create(namespace, body)
    wait_for("phase Failed", lambda: status(namespace, "grpo").get("phase") == "Failed", operator=operator)
    message = status(namespace, "grpo")["message"]
    assert "spec.checkpoint.storage.emptyDir: got True" in message and "RestartFromCheckpoint" in message
    assert not pods(namespace)
    assert not client.CoreV1Api().list_namespaced_persistent_volume_claim(namespace).items
