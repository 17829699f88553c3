"""What the operator would create for a job, computed without a cluster."""

import json

import pytest
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
    assert view.failed and view.failure().reported_error
    assert view.failure().describe().endswith("failed (exit code 3, Error): CUDA out of memory")

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


# -- Pod Security "restricted" ------------------------------------------------------------------

RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}


@pytest.mark.parametrize("role", ["trainer", "generator", "reward", "reference", "controller"])
def test_every_role_pod_passes_pod_security_restricted_with_writable_paths(minimal_job, role):
    ref, spec = _job(minimal_job, roles={"reference": {"enabled": True}})
    pod = r.pod(ref, spec, r.Instance(role, 0))
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["securityContext"] == RESTRICTED_POD
    assert container["securityContext"] == RESTRICTED_CONTAINER
    assert pod["spec"]["automountServiceAccountToken"] is False
    # The root filesystem is read-only: every path a role writes is a volume.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for path in ("/dev/shm", "/tmp", r.HOME_DIR, r.RUN_DIR):
        assert path in mounts, path
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {} and volumes[mounts[r.HOME_DIR]]["emptyDir"] == {}
    assert _env(pod)["HOME"] == r.HOME_DIR  # HF, vLLM, Triton, matplotlib and numba caches follow HOME


def test_a_role_may_keep_a_writable_root_and_its_own_home(minimal_job):
    ref, spec = _job(
        minimal_job, roles={"generator": {"readOnlyRootFilesystem": False, "env": {"HOME": "/scratch/home"}}}
    )
    generator = r.pod(ref, spec, r.Instance("generator", 0))
    assert generator["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
    assert _env(generator)["HOME"] == "/scratch/home"
    assert [e["name"] for e in generator["spec"]["containers"][0]["env"]].count("HOME") == 1
    trainer = r.pod(ref, spec, r.Instance("trainer", 0))
    assert trainer["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


# -- The run directory's storage ----------------------------------------------------------------

CLAIM = "demo-checkpoints-uid-1"


@pytest.mark.parametrize(
    ("storage", "run_volume", "claim_spec", "owned", "affinity"),
    [
        # Default: a per-job ReadWriteOnce claim from the default StorageClass, kept after the RLJob.
        (
            {},
            {"persistentVolumeClaim": {"claimName": CLAIM}},
            {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}},
            False,
            True,
        ),
        (
            {"storageClassName": "nfs", "size": "2Ti", "accessMode": "ReadWriteMany", "whenDeleted": "Delete"},
            {"persistentVolumeClaim": {"claimName": CLAIM}},
            {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "2Ti"}},
                "storageClassName": "nfs",
            },
            True,
            False,
        ),
        # A claim of the user's: mounted, never created (nor deleted) by the operator.
        ({"claimName": "team-ckpt"}, {"persistentVolumeClaim": {"claimName": "team-ckpt"}}, None, None, True),
        (
            {"claimName": "team-ckpt", "accessMode": "ReadWriteMany"},
            {"persistentVolumeClaim": {"claimName": "team-ckpt"}},
            None,
            None,
            False,
        ),  # fmt: skip
        ({"emptyDir": True}, {"emptyDir": {}}, None, None, False),
    ],
)
def test_the_trainer_and_controller_keep_their_run_directory_on_the_checkpoint_storage(
    minimal_job, storage, run_volume, claim_spec, owned, affinity
):
    rules = [{"role": role, "action": "FailJob"} for role in ("trainer", "controller")]
    ref, spec = _job(minimal_job, checkpoint={"storage": storage}, failurePolicy={"rules": rules})
    for role in ("trainer", "controller"):
        volumes = {v["name"]: v for v in r.pod(ref, spec, r.Instance(role, 0))["spec"]["volumes"]}
        assert {k: v for k, v in volumes["run"].items() if k != "name"} == run_volume, role
    for role in ("generator", "reward"):  # nothing of theirs must outlive them: no tie to the claim's node
        volumes = {v["name"]: v for v in r.pod(ref, spec, r.Instance(role, 0))["spec"]["volumes"]}
        assert volumes["run"]["emptyDir"] == {}, role

    claim = r.checkpoint_claim(ref, spec)
    if claim_spec is None:
        assert claim is None
    else:
        assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == CLAIM
        assert claim["spec"] == claim_spec
        assert claim["metadata"]["labels"]["kubeforge.dev/job"] == "demo"
        # Retain: no owner, so the garbage collector leaves it when the RLJob is deleted.
        assert ("ownerReferences" in claim["metadata"]) is owned
        if not owned:
            assert claim["metadata"]["annotations"] == {"kubeforge.dev/job-uid": "uid-1"}

    # One node mounts a ReadWriteOnce claim: the controller follows trainer-0 there.
    controller = r.pod(ref, spec, r.Instance("controller", 0))
    assert ("affinity" in controller["spec"]) is affinity
    if affinity:
        (term,) = controller["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        trainer0 = r.pod(ref, spec, r.Instance("trainer", 0))["metadata"]["labels"]
        assert term["labelSelector"]["matchLabels"].items() <= trainer0.items()
    assert "affinity" not in r.pod(ref, spec, r.Instance("trainer", 0))["spec"]


def test_a_recreated_job_of_the_same_name_gets_a_claim_of_its_own(minimal_job):
    _, spec = _job(minimal_job)
    first = r.checkpoint_claim(r.JobRef("demo", "team", "0a1b2c3d-aaaa"), spec)
    again = r.checkpoint_claim(r.JobRef("demo", "team", "9f8e7d6c-bbbb"), spec)
    assert first["metadata"]["name"] == "demo-checkpoints-0a1b2c3d"
    assert again["metadata"]["name"] != first["metadata"]["name"]


# -- NetworkPolicy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace_labels", "pod_labels", "scraper_peer"),
    [
        ("", "", None),
        ("", "app.kubernetes.io/name=prometheus",
         {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}),
        ("kubernetes.io/metadata.name=monitoring", "",
         {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}),
        ("kubernetes.io/metadata.name=monitoring", "app=prometheus,shard=0",
         {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
          "podSelector": {"matchLabels": {"app": "prometheus", "shard": "0"}}}),
    ],
)  # fmt: skip
def test_the_network_policy_admits_the_jobs_own_pods_and_the_scraper_on_the_role_port_only(
    minimal_job, namespace_labels, pod_labels, scraper_peer
):
    ref, _ = _job(minimal_job)
    policy = r.network_policy(ref, r.Scraper.parse(namespace_labels, pod_labels))
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"kubeforge.dev/job": "demo"}}
    assert spec["policyTypes"] == ["Ingress"]
    own, *rest = spec["ingress"]
    # Every port between the job's pods: the stores, and gloo/NCCL's ephemeral ports.
    assert own == {"from": [{"podSelector": {"matchLabels": {"kubeforge.dev/job": "demo"}}}]}
    if scraper_peer is None:
        assert rest == []
    else:
        assert rest == [{"from": [scraper_peer], "ports": [{"protocol": "TCP", "port": r.HTTP_PORT}]}]
    # No rule for the operator: progress goes from the controller to the operator, never back.
    peers = [p for rule in spec["ingress"] for p in rule["from"]]
    assert not any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "forge-operator"
                   for p in peers)  # fmt: skip


@pytest.mark.parametrize("bad", ["app", "app=", "=x", "app=prom etheus", "-bad=x"])
def test_scraper_labels_that_are_not_labels_are_refused_with_the_flag(bad):
    if bad == "app=":  # an empty value is a valid label value
        assert r.Scraper.parse("", bad) == r.Scraper({}, {"app": ""})
        return
    with pytest.raises(ValueError, match=r"--scraper-pod-labels: got .*expected KEY=VALUE"):
        r.Scraper.parse("", bad)


@pytest.mark.parametrize(
    ("role", "keys"),
    [
        ("controller", ["controller", "digests.json", "job"]),
        ("trainer", ["digests.json", "job", "trainer"]),
        ("generator", ["digests.json", "job"]),
        ("reward", ["digests.json", "job"]),
    ],
)
def test_each_pod_mounts_only_the_tokens_its_role_holds(minimal_job, role, keys):
    ref, spec = _job(minimal_job)
    pod = r.pod(ref, spec, r.Instance(role, 0))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "tokens")["secret"]
    assert volume["secretName"] == ref.secret_name
    assert sorted(item["key"] for item in volume["items"]) == keys
    assert volume["defaultMode"] == 0o440  # the runtime user reads them through fsGroup; nobody else
    container = pod["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tokens")
    assert mount == {"name": "tokens", "mountPath": r.TOKEN_DIR, "readOnly": True}
    assert _env(pod)["KUBEFORGE_TOKEN_DIR"] == r.TOKEN_DIR
    assert not any("valueFrom" in e for e in container["env"])  # no token in the environment


def test_the_secret_holds_every_token_and_their_digests(minimal_job):
    from kubeforge import auth

    ref, _ = _job(minimal_job)
    tokens = auth.new_tokens()
    secret = r.secret(ref, tokens)
    data = secret["stringData"]
    assert {k: data[k] for k in auth.CREDENTIALS} == tokens
    assert json.loads(data[auth.DIGESTS_FILE]) == auth.digests(tokens)
