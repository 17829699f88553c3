"""What the operator would create for a job, computed without a cluster."""

import json

from kubeforge.validation import parse_job
from kubeforge_operator import resources as r
from kubeforge_operator.reconcile import PodView


def _job(minimal_job, **spec):
    minimal_job["spec"].update(spec)
    job = parse_job(minimal_job)
    return r.JobRef(job.name, "team", "uid-1"), job.spec


def _env(pod):
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_pods_carry_placement_resources_and_volumes(minimal_job):
    ref, spec = _job(
        minimal_job,
        image="registry.example/kubeforge:1",
        volumes=[{"name": "models", "claimName": "model-store", "mountPath": "/models", "readOnly": True}],
        scheduling={
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
        },
        roles={
            "trainer": {"gpusPerNode": 8, "cpu": 64, "memory": "512Gi", "nodeSelector": {"nvlink": "true"}},
            "generator": {"gpus": 2, "tensorParallel": 2, "image": "registry.example/kubeforge-vllm:1"},
        },
    )
    trainer = r.pod(ref, spec, r.Instance("trainer", 0))
    container = trainer["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["command"] == ["python", "-m", "torch.distributed.run", "-m", "kubeforge.trainer"]
    assert container["image"] == "registry.example/kubeforge:1"
    assert trainer["spec"]["nodeSelector"] == {"pool": "h100", "nvlink": "true"}
    assert trainer["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert trainer["spec"]["priorityClassName"] == "training"
    assert trainer["spec"]["restartPolicy"] == "Never"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    volumes = {v["name"]: v for v in trainer["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"

    generator = r.pod(ref, spec, r.Instance("generator", 0))
    assert generator["spec"]["containers"][0]["image"] == "registry.example/kubeforge-vllm:1"
    assert generator["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert generator["spec"]["nodeSelector"] == {"pool": "h100"}
    controller = r.pod(ref, spec, r.Instance("controller", 0))
    assert (
        "resources" not in controller["spec"]["containers"][0] or not controller["spec"]["containers"][0]["resources"]
    )


def test_pods_find_each_other_by_stable_dns_names(minimal_job):
    ref, spec = _job(minimal_job, roles={"trainer": {"nodes": 2}, "generator": {"replicas": 2}})
    pod = r.pod(ref, spec, r.Instance("trainer", 1), restart_generation=3, progress_url_base="http://op:8081")
    env = _env(pod)
    assert pod["metadata"]["name"] == "demo-trainer-1"
    assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == ("demo-trainer-1", "demo")
    assert pod["metadata"]["labels"]["kubeforge.dev/restart-generation"] == "3"
    assert env["PET_MASTER_ADDR"] == "demo-trainer-0.demo.team.svc"
    assert env["KUBEFORGE_GENERATOR_URLS"] == (
        "http://demo-generator-0.demo.team.svc:8000,http://demo-generator-1.demo.team.svc:8000"
    )
    assert env["KUBEFORGE_SPEC"] == "/etc/kubeforge/spec.json"
    assert env["KUBEFORGE_TERMINATION_LOG"] == "/dev/termination-log"
    assert "KUBEFORGE_PROGRESS_URL" not in env  # the controller's only
    assert (
        _env(r.pod(ref, spec, r.Instance("controller", 0), progress_url_base="http://op:8081"))[
            "KUBEFORGE_PROGRESS_URL"
        ]
        == "http://op:8081/progress/team/demo"
    )
    assert pod["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kubeforge.dev/v1alpha1", "kind": "RLJob", "name": "demo", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True,
    }  # fmt: skip


def test_the_service_is_headless_and_publishes_unready_pods(minimal_job):
    ref, _ = _job(minimal_job)
    service = r.service(ref)
    assert service["metadata"]["name"] == "demo"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"kubeforge.dev/job": "demo"}


def test_gang_mechanisms_mark_pods_and_make_pod_groups(minimal_job):
    ref, spec = _job(minimal_job, scheduling={"gang": "volcano", "queue": "research"})
    pod = r.pod(ref, spec, r.Instance("generator", 0))
    assert pod["metadata"]["annotations"] == {"scheduling.k8s.io/group-name": "demo"}
    assert pod["spec"]["schedulerName"] == "volcano"
    group = r.pod_group(ref, spec)
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"] == {"minMember": 4, "queue": "research"}

    ref, spec = _job(minimal_job, scheduling={"gang": "coscheduling", "schedulerName": "scheduler-plugins"})
    pod = r.pod(ref, spec, r.Instance("reward", 0))
    assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "demo"
    assert pod["spec"]["schedulerName"] == "scheduler-plugins"
    assert r.pod_group(ref, spec)["spec"] == {"minMember": 4}

    ref, spec = _job(minimal_job, scheduling={"gang": "capacity"})
    assert r.pod_group(ref, spec) is None
    assert "annotations" not in r.pod(ref, spec, r.Instance("reward", 0))["metadata"]


def test_pod_views_read_the_api_servers_json(minimal_job):
    """The reconciler reads listed pods as JSON (camelCase), not as client models."""
    ref, spec = _job(minimal_job)
    pod = r.pod(ref, spec, r.Instance("trainer", 1))
    assert PodView.of(pod) == PodView(pod["metadata"]["name"], r.Instance("trainer", 1), "Pending", False, False)

    pod["metadata"]["deletionTimestamp"] = "2026-11-27T00:00:00Z"
    last_words = json.dumps({"error": "CUDA out of memory"})
    pod["status"] = {
        "phase": "Failed",
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
        "containerStatuses": [
            {"name": "role", "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": last_words}}}
        ],
    }
    view = PodView.of(pod)
    assert (view.phase, view.ready, view.terminating) == ("Failed", True, True)
    assert (view.exit_code, view.reason, view.message) == (3, "Error", last_words)
    assert view.failed and view.reported_error
    assert view.describe_failure().endswith("failed (exit code 3, Error): CUDA out of memory")

    running = {"phase": "Running", "containerStatuses": [{"name": "role", "state": {"running": {}}}]}
    view = PodView.of({"metadata": pod["metadata"] | {"deletionTimestamp": None}, "status": running})
    assert (view.phase, view.ready, view.terminating, view.exit_code, view.message) == (
        "Running",
        False,
        False,
        None,
        "",
    )
    assert PodView.of({"metadata": {"name": "stranger", "labels": {r.LABEL_JOB: "j"}}}) is None
