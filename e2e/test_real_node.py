"""The Kubernetes path on a real node, as a user walks it: `make images`, `helm install` runs the
operator from its image as a pod, and `kubectl apply` of an RLJob trains in real containers.

Everything here runs on the testbed's real node (kubelet, containerd, CNI, kube-proxy, kube-router,
CoreDNS, local-path-provisioner; e2e/conftest.py), in namespaces that enforce Pod Security
"restricted". The images are the ones `make images` builds (images/build.sh), imported into the
node's containerd; nothing is pulled.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import CHART, helm
from cluster import GROUP, PLURAL, REPO, TESTBED, VERSION, clean_env, wait_for
from kubeforge.episodes import Ledger
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# The real node is tainted so that only pods that ask for it land there (testbed/start-node.sh).
ON_REAL_NODE: dict[str, Any] = {
    "nodeSelector": {"kubeforge.dev/node": "real"},
    "tolerations": [{"key": "kubeforge.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}],
}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
# A container that passes "restricted" (what the operator's own pods carry).
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def images(cluster: Path, cluster_dir: Path) -> dict[str, str]:
    """`make images` (cached when nothing changed), imported into the real node: name -> reference."""
    built = subprocess.run(
        [str(REPO / "images" / "build.sh")], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=3600
    )
    if built.returncode != 0:
        pytest.fail(f"images/build.sh failed:\n{built.stderr[-4000:]}")
    refs: dict[str, str] = {}
    tarballs = []
    for line in built.stdout.splitlines():
        ref, _, tarball = line.partition(" ")
        if tarball.endswith(".tar"):
            refs[ref.split("/")[-1].split(":")[0]] = ref
            tarballs.append(tarball)
    assert {"operator", "runtime-cpu"} <= refs.keys(), (
        f"images/build.sh named no operator/runtime-cpu image:\n{built.stdout}"
    )
    imported = subprocess.run(
        [str(TESTBED / "node-images.sh"), str(cluster_dir), *tarballs],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if imported.returncode != 0:
        pytest.fail(f"node-images.sh failed:\n{imported.stderr[-4000:]}")
    print(imported.stderr.strip())  # import times, for docs/benchmarks.md
    return refs


def restricted_namespace(prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api().create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    return name


@pytest.fixture(scope="module")
def jobs_namespace(cluster: Path) -> Iterator[str]:
    name = restricted_namespace("rn-jobs")
    yield name
    client.CoreV1Api().delete_namespace(name)


@pytest.fixture(scope="module")
def forge(
    cluster: Path, images: dict[str, str], jobs_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`helm install forge-operator` from the built operator image, watching the jobs' namespace.
    Yields the operator's namespace."""
    namespace = restricted_namespace("rn-forge")
    home = tmp_path_factory.mktemp("helm")
    repository, _, tag = images["operator"].rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "watchNamespaces": [jobs_namespace],
        "crds": {"install": False},  # the session fixture installed it
        **ON_REAL_NODE,
    }
    values_file = home / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(
        "install",
        "forge-operator",
        str(CHART),
        "--namespace",
        namespace,
        "-f",
        str(values_file),
        kubeconfig=cluster,
        home=home,
    )
    apps = client.AppsV1Api()

    def ready() -> bool:
        deployments = apps.list_namespaced_deployment(namespace).items
        return bool(deployments) and all((d.status.ready_replicas or 0) >= 1 for d in deployments)

    try:
        try:
            wait_for("the operator's Deployment Ready on the real node", ready, timeout=180)
        except AssertionError as e:
            pods = client.CoreV1Api().list_namespaced_pod(namespace).items
            logs = "\n".join(f"--- {p.metadata.name}: {p.status.phase}\n{pod_logs(namespace, p.metadata.name)}"
                             for p in pods)  # fmt: skip
            raise AssertionError(f"{e}\n{logs}") from None
        yield namespace
    finally:
        helm("uninstall", "forge-operator", "--namespace", namespace, kubeconfig=cluster, home=home)
        client.CoreV1Api().delete_namespace(namespace)


# -- helpers ------------------------------------------------------------------------------------------


def rljob(namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def job_pods(namespace: str, name: str) -> list[client.V1Pod]:
    return client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"kubeforge.dev/job={name}").items


def pod_logs(namespace: str, name: str, tail_lines: int | None = 60) -> str:
    try:
        return client.CoreV1Api().read_namespaced_pod_log(name, namespace, tail_lines=tail_lines)
    except ApiException as e:
        return f"(no log: {e.status})"


def describe(namespace: str, name: str) -> str:
    """The job's status and each pod's phase and last log lines, for a failure message."""
    out = [json.dumps(rljob(namespace, name).get("status", {}), indent=1)[-3000:]]
    for p in job_pods(namespace, name):
        out.append(f"--- {p.metadata.name}: {p.status.phase}\n{pod_logs(namespace, p.metadata.name)[-1500:]}")
    return "\n".join(out)


def run_pod(
    namespace: str,
    name: str,
    image: str,
    command: list[str],
    volumes: list[dict[str, Any]] = (),
    mounts: list[dict[str, Any]] = (),
    labels: dict[str, str] | None = None,
    timeout: float = 300,
) -> str:
    """Run a restricted pod on the real node to completion; its log. Fails with the log unless it succeeded."""
    core = client.CoreV1Api()
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": RESTRICTED_POD,
                **ON_REAL_NODE,
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": command,
                        "securityContext": RESTRICTED_CONTAINER,
                        "volumeMounts": list(mounts),
                        "env": [{"name": "HOME", "value": "/tmp"}],
                    }
                ],
                "volumes": list(volumes),
            },
        },
    )
    phase = wait_for(
        f"pod {namespace}/{name} to finish",
        lambda: (
            core.read_namespaced_pod(name, namespace).status.phase in ("Succeeded", "Failed")
            and core.read_namespaced_pod(name, namespace).status.phase
        ),
        timeout=timeout,
    )
    log = pod_logs(namespace, name)
    assert phase == "Succeeded", f"pod {name} {phase}:\n{log}"
    return log


# -- the tests ------------------------------------------------------------------------------------------


def test_the_operator_runs_from_its_image_in_a_pod_with_in_cluster_config(forge: str, images: dict[str, str]) -> None:
    pods = client.CoreV1Api().list_namespaced_pod(forge).items
    assert pods, "helm install created no operator pod"
    (pod,) = [p for p in pods if p.status.phase == "Running"]
    assert pod.spec.node_name.startswith("kubeforge-node-"), (
        f"the operator runs on {pod.spec.node_name}, not the real node"
    )
    assert pod.spec.containers[0].image == images["operator"]
    assert all(c.ready for c in pod.status.container_statuses)


def test_a_job_whose_image_does_not_exist_is_named_within_60s_and_fails_at_its_startup_deadline(
    forge: str, jobs_namespace: str
) -> None:
    name = "missing-image"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RLJob",
        "metadata": {"name": name},
        "spec": {
            "image": "kubeforge/does-not-exist:0.0.0",
            "model": {"path": "/models/none"},
            "steps": 1,
            "startupDeadlineSeconds": 90,
            "scheduling": ON_REAL_NODE,
            "roles": {"controller": {"app": "apps.grpo.main"}, "generator": {"replicas": 1}, "reward": {"replicas": 1}},
        },
    }
    client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, jobs_namespace, PLURAL, body)
    created = time.monotonic()
    stuck = wait_for(
        "the missing image named in status.stuck",
        lambda: (rljob(jobs_namespace, name).get("status") or {}).get("stuck"),
        timeout=60,
    )
    assert stuck["reason"] in ("ErrImagePull", "ImagePullBackOff"), stuck
    assert stuck["image"] == "kubeforge/does-not-exist:0.0.0" and stuck["pod"].startswith(name), stuck
    assert time.monotonic() - created < 60
    events = (
        client.CoreV1Api().list_namespaced_event(jobs_namespace, field_selector=f"involvedObject.name={name}").items
    )
    assert any("does-not-exist" in (e.message or "") for e in events), [e.message for e in events]
    wait_for(
        "the job Failed at its startup deadline",
        lambda: rljob(jobs_namespace, name)["status"].get("phase") == "Failed",
        timeout=180,
    )
    wait_for("no pod of the job left", lambda: not job_pods(jobs_namespace, name), timeout=90)
    assert "startupDeadlineSeconds" in rljob(jobs_namespace, name)["status"]["message"]


# Connects to each host:port given on the command line (1.5 s each); prints {"host:port": "open"|error}.
PROBE = """
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.5).close()
        out[target] = "open"
    except OSError as e:
        out[target] = type(e).__name__
print(json.dumps(out))
"""
# GETs /metrics of each host given, as a scraper does: again every 2 s for up to 60 s (kube-router
# admits a new pod once it has synced it into the policy's ipset); prints {host: status or error}.
SCRAPE = """
import json, sys, time, urllib.request
out = {}
for host in sys.argv[1:]:
    deadline = time.monotonic() + 60
    while True:
        try:
            out[host] = urllib.request.urlopen(f"http://{host}:8000/metrics", timeout=5).status
            break
        except Exception as e:
            out[host] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if time.monotonic() > deadline:
                break
            time.sleep(2)
print(json.dumps(out))
"""


def probe_from(namespace: str, name: str, image: str, script: str, targets: list[str], labels: dict[str, str]) -> dict:
    return json.loads(
        run_pod(namespace, name, image, ["python", "-c", script, *targets], labels=labels).splitlines()[-1]
    )


def probe_from_node(targets: list[str]) -> dict:
    """The same probe from the node itself (its network namespace): the ports listen, whatever the policy."""
    netns = next(Path("/var/run/netns").glob("kubeforge-node-*"))
    done = subprocess.run(["nsenter", f"--net={netns}", "python3", "-c", PROBE, *targets],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def check_network_policy(namespace: str, job: str, images: dict[str, str]) -> None:
    """Only the job's own pods reach its role ports and stores; the chart's scraper reaches /metrics."""
    pods = {p.metadata.labels["kubeforge.dev/role"]: p.status.pod_ip for p in job_pods(namespace, job)}
    targets = [f"{ip}:8000" for ip in pods.values()] + [f"{pods['trainer']}:{port}" for port in (29500, 29600)]
    listening = probe_from_node(targets)
    assert set(listening.values()) == {"open"}, (
        f"not every port listens, so the probes below prove nothing: {listening}"
    )
    stranger = probe_from(namespace, "stranger", images["operator"], PROBE, targets, labels={"app": "stranger"})
    other_ns = restricted_namespace("rn-other")
    try:
        outsider = probe_from(other_ns, "outsider", images["operator"], PROBE, targets, labels={})
        # The scraper the chart admits by default: pods labelled app.kubernetes.io/name=prometheus.
        scraper = probe_from(other_ns, "scraper", images["operator"], SCRAPE, list(pods.values()),
                             labels={"app.kubernetes.io/name": "prometheus"})  # fmt: skip
    finally:
        client.CoreV1Api().delete_namespace(other_ns)
    assert "open" not in stranger.values(), f"a pod of the namespace that is not the job's got in: {stranger}"
    assert "open" not in outsider.values(), f"a pod of another namespace got in: {outsider}"
    assert set(scraper.values()) == {200}, f"the scraper could not read /metrics: {scraper}"


def claim_directory(namespace: str, claim: str) -> Path:
    """Where local-path-provisioner keeps a bound claim on the node: the storage itself, read from here."""
    core = client.CoreV1Api()
    pv = core.read_persistent_volume(core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name)
    return Path((pv.spec.host_path or pv.spec.local).path)


def test_apply_trains_in_real_containers_and_survives_deleted_pods(
    forge: str, jobs_namespace: str, images: dict[str, str]
) -> None:
    """The tiny GRPO example, CPU variant, its model prepared on a PVC: every role a pod on the real
    node, peers found through Service DNS, weight sync over gloo between pods. Once it trains, a
    second generator is added with a spec edit and joins. After the first checkpoint past the
    warm-up the trainer, a generator and the controller are deleted with `kubectl delete pod`; the
    job still learns as `make run` does, resumes past step 0, and its ledger ends exact."""
    core, custom, ns, name = client.CoreV1Api(), client.CustomObjectsApi(), jobs_namespace, "grpo-tiny"
    core.create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    run_pod(
        ns,
        "prepare-model",
        images["runtime-cpu"],
        ["python", "-m", "kubeforge.tiny_model", "/models/tiny-qwen3"],
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        mounts=[{"name": "models", "mountPath": "/models"}],
    )

    body = yaml.safe_load((REPO / "apps" / "grpo" / "tiny.yaml").read_text())
    spec = body["spec"]
    spec["image"] = images["runtime-cpu"]
    spec["model"]["path"] = "/models/tiny-qwen3"
    spec["volumes"] = [{"name": "models", "claimName": "models", "mountPath": "/models", "readOnly": True}]
    spec["scheduling"] = ON_REAL_NODE
    spec["checkpoint"] = {"interval": 5}
    spec["steps"] = 60  # time to add a generator, then delete pods, while it trains
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    started = time.monotonic()

    def progress() -> dict[str, Any]:
        return (rljob(ns, name).get("status") or {}).get("progress") or {}

    def all_ready() -> bool:
        pods = job_pods(ns, name)
        return len(pods) == 4 and all(
            p.status.container_statuses and p.status.container_statuses[0].ready for p in pods
        )

    try:
        wait_for("every pod of the job Ready", all_ready, timeout=600)
        ready_seconds = time.monotonic() - started
        for p in job_pods(ns, name):
            assert p.spec.node_name.startswith("kubeforge-node-"), f"{p.metadata.name} ran on {p.spec.node_name}"
        check_network_policy(ns, name, images)
        # Issue 16, item 13: a generator added to the running job joins it. The operator rewrites the peers
        # the pods read; the running controller takes the replica in (its log says so before it is deleted
        # below) and the trainer accepts it as a publish target: the job could not succeed otherwise.
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, {"spec": {"roles": {"generator": {"replicas": 2}}}}
        )
        run_dir = claim_directory(
            ns,
            next(
                c.metadata.name
                for c in core.list_namespaced_persistent_volume_claim(
                    ns, label_selector=f"kubeforge.dev/job={name}"
                ).items
            ),
        )
        # Checkpoints count the trainer's steps: the supervised warm-up's, then GRPO's. Wait for one
        # past the warm-up, so that the restarted controller has RL steps to resume from.
        warmup = spec["algorithm"].get("warmupSteps", 0)

        def past_warmup() -> bool:
            done = (run_dir / "checkpoints").glob("step-*/COMPLETE")
            return any(int(marker.parent.name.removeprefix("step-")) > warmup for marker in done)

        wait_for("a checkpoint past the warm-up on the job's claim", past_warmup, timeout=900)
        # Live progress: the controller pushes it to the operator's progress Service as it goes.
        wait_for("the step in status while the job runs", lambda: progress().get("step", 0) > 0, timeout=120)

        def took_in_the_added_generator() -> bool:
            log = pod_logs(ns, f"{name}-controller-0", tail_lines=None)
            return any("generator replicas now" in line and f"{name}-generator-1." in line for line in log.splitlines())

        wait_for("the running controller took the added generator in", took_in_the_added_generator, timeout=300)
        for role in ("trainer-0", "generator-0", "controller-0"):
            core.delete_namespaced_pod(f"{name}-{role}", ns)
        wait_for(
            "the job Succeeded", lambda: rljob(ns, name)["status"].get("phase") in ("Succeeded", "Failed"), timeout=1500
        )
        status = rljob(ns, name)["status"]
        assert status["phase"] == "Succeeded", describe(ns, name)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{describe(ns, name)}") from None
    apply_to_succeeded = time.monotonic() - started
    print(f"real node: apply -> all pods Ready {ready_seconds:.0f} s, apply -> Succeeded {apply_to_succeeded:.0f} s")

    assert status["progress"]["step"] == spec["steps"]
    assert status["progress"]["heldOutReward"] >= 1.0, status["progress"]
    table = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)  # the printer columns' paths
    assert table["status"]["progress"]["heldOutReward"] == status["progress"]["heldOutReward"]
    wait_for(
        "only the controller's pod left",
        lambda: all(p.metadata.name.endswith("-controller-0") for p in job_pods(ns, name)),
        timeout=120,
    )

    # The storage outlived the pods: the final checkpoint, the metrics and the ledger are there.
    final = run_dir / "checkpoints" / f"step-{spec['steps'] + warmup}"
    assert (final / "COMPLETE").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    steps_in_metrics = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert spec["steps"] in steps_in_metrics
    ledger = Ledger.from_json(json.loads((run_dir / "episodes.json").read_text()))
    algorithm = spec["algorithm"]
    assert ledger.exactness_problems(spec["steps"] * algorithm["promptsPerStep"], algorithm["groupSize"]) == []
    # The restarted controller resumed from the checkpoint, not from step 0.
    controller_log = client.CoreV1Api().read_namespaced_pod_log(f"{name}-controller-0", ns)
    resumed = [int(m) for m in re.findall(r"resuming at step (\d+)", controller_log)]
    assert resumed and resumed[0] > 0, controller_log[-3000:]
