"""The Helm chart (helm/forge-operator): lint, what it renders for the main option combinations,
its CRD against crds/rljob.yaml, and install / upgrade / uninstall on the test control plane.
The operator running with the chart's RBAC is e2e/test_rbac.py."""

from __future__ import annotations

import base64
import difflib
import json
import shutil
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart import CHART, helm, render
from cluster import GROUP, PLURAL, REPO, VERSION
from kubeforge import auth
from kubeforge_operator.resources import HTTP_PORT, JobRef, Scraper, network_policy
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster

CRD_NAME = "rljobs.kubeforge.dev"
KEEP = {"helm.sh/resource-policy": "keep"}


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, rendered {[(o['kind'], o['metadata']['name']) for o in objects]}"
    )
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objects)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_lint(tmp_path: Path) -> None:
    for values in ([], ["--set", "clusterWide=true"], ["--set", "metrics.serviceMonitor.enabled=true"]):
        out = helm("lint", "--strict", str(CHART), *values, home=tmp_path)
        assert "0 chart(s) failed" in out, out


def test_values_are_checked(tmp_path: Path) -> None:
    # values.schema.json: a misspelt or mistyped value is an error, not silently the default.
    with pytest.raises(AssertionError, match="additional properties 'watchNamespace' not allowed"):
        render("watchNamespace={team-a}", home=tmp_path)
    with pytest.raises(AssertionError, match="/clusterWide.*want boolean"):
        render("clusterWide=maybe", home=tmp_path)


def test_default_render(tmp_path: Path) -> None:
    objects = render(home=tmp_path)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ns = "kubeforge-system"
    expected = [
        ("ClusterRole", "forge-operator-capacity", None),
        ("ClusterRoleBinding", "forge-operator-capacity", None),
        ("CustomResourceDefinition", CRD_NAME, None),
        ("Deployment", "forge-operator", ns),
        ("Role", "forge-operator", ns),
        ("Role", "forge-operator-leader-election", ns),
        ("RoleBinding", "forge-operator", ns),
        ("RoleBinding", "forge-operator-leader-election", ns),
        ("Secret", "forge-operator-token-key", ns),
        ("Service", "forge-operator", ns),
        ("Service", "forge-operator-metrics", ns),
        ("ServiceAccount", "forge-operator", ns),
    ]
    if list(CHART.glob("dashboards/*.json")):
        expected.append(("ConfigMap", "forge-operator-dashboards", ns))
    assert kinds(objects) == sorted(expected)

    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]
    c = container(objects)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert only(render("replicas=3", home=tmp_path), "Deployment")["spec"]["replicas"] == 3  # one leads
    # The tag `make images` builds (images/tags.py); tests/test_images.py checks values.yaml names it.
    assert c["image"] == f"kubeforge/operator:{yaml.safe_load((CHART / 'values.yaml').read_text())['image']['tag']}"
    # Images are tagged with the package version (docs/images.md), so appVersion must follow it.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version, f"helm/forge-operator/Chart.yaml appVersion must be {version}"
    assert c["command"] == ["python", "-m", "kubeforge_operator"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    progress = only(objects, "Service", "forge-operator")["spec"]["ports"][0]
    assert c["args"] == [
        f"--namespace={ns}",
        f"--metrics-port={ports['metrics']}",
        f"--liveness=http://0.0.0.0:{ports['health']}/healthz",
        f"--progress-listen=0.0.0.0:{ports['progress']}",
        f"--progress-url-base=http://forge-operator.{ns}.svc:{progress['port']}",
        "--token-key-file=/var/run/kubeforge/token-key/key",
        "--scraper-pod-labels=app.kubernetes.io/name=prometheus",
    ]
    # The token signing key (kubeforge_operator.signing): made by the chart, kept, mounted read-only.
    key = only(objects, "Secret", "forge-operator-token-key")
    assert key["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(key["data"]["key"])) >= auth.MIN_KEY_BYTES
    mount = next(m for m in c["volumeMounts"] if m["name"] == "token-key")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "token-key")
    assert mount == {"name": "token-key", "mountPath": "/var/run/kubeforge/token-key", "readOnly": True}
    assert pod["spec"]["securityContext"]["fsGroup"] == pod["spec"]["securityContext"]["runAsGroup"]  # reads it
    assert volume["secret"] == {
        "secretName": "forge-operator-token-key",
        "items": [{"key": "key", "path": "key"}],
        "defaultMode": 0o440,
    }
    # A key of the user's own: the chart makes none and mounts theirs.
    own = render("tokenKey.existingSecret=my-key", "tokenKey.secretKey=k", home=tmp_path)
    assert not [o for o in own if o["kind"] == "Secret"]
    assert next(v for v in only(own, "Deployment")["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "token-key")["secret"]["secretName"] == "my-key"  # fmt: skip
    assert progress["targetPort"] == "progress"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["tcpSocket"] == {"port": "progress"}
    assert c["resources"]["requests"].keys() == {"cpu", "memory"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True and pod["spec"]["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["serviceAccountName"] == only(objects, "ServiceAccount")["metadata"]["name"]

    labels = pod["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert selects(service["spec"]["selector"], labels), service["metadata"]["name"]
    # Each job's NetworkPolicy admits the scraper the chart names, on the role port, and never the
    # operator's pod: progress flows from the controller to the operator, not back.
    scraper = Scraper.parse(*(a.split("=", 1)[1] if a else "" for a in _scraper_args(c["args"])))
    policy = network_policy(JobRef("j", "ns", "uid"), scraper)
    admitted = [
        p.get("podSelector", {}).get("matchLabels", {}) for rule in policy["spec"]["ingress"] for p in rule["from"]
    ]
    assert not any(selects(s, labels) for s in admitted), (admitted, labels)
    assert any(selects(s, {"app.kubernetes.io/name": "prometheus"}) for s in admitted), admitted
    assert policy["spec"]["ingress"][-1]["ports"] == [{"protocol": "TCP", "port": HTTP_PORT}]

    for name in ("forge-operator", "forge-operator-leader-election"):
        role = only(objects, "Role", name)
        binding = only(objects, "RoleBinding", name)
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "forge-operator", "namespace": ns}]
    # Leader election (kubeforge_operator.leader): its own Lease, and no other.
    assert only(objects, "Role", "forge-operator-leader-election")["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["kubeforge-operator"],
         "verbs": ["get", "update"]},
    ]  # fmt: skip
    # Cluster-wide, the operator may only read.
    capacity = only(objects, "ClusterRole", "forge-operator-capacity")
    assert {v for rule in capacity["rules"] for v in rule["verbs"]} <= {"get", "list", "watch"}


def _scraper_args(args: list[str]) -> tuple[str, str]:
    """The operator's --scraper-namespace-labels and --scraper-pod-labels arguments ('' if absent)."""
    found = {a.split("=", 1)[0]: a for a in args if a.startswith("--scraper-")}
    return found.get("--scraper-namespace-labels", ""), found.get("--scraper-pod-labels", "")


def test_the_scraper_and_the_operators_network_policy(tmp_path: Path) -> None:
    objects = render("metrics.scraper.namespaceLabels.kubernetes\\.io/metadata\\.name=monitoring",
                     "networkPolicy.enabled=true", home=tmp_path)  # fmt: skip
    assert _scraper_args(container(objects)["args"]) == (
        "--scraper-namespace-labels=kubernetes.io/metadata.name=monitoring",
        "--scraper-pod-labels=app.kubernetes.io/name=prometheus",
    )
    assert _scraper_args(container(render("metrics.scraper.podLabels=null", home=tmp_path))["args"]) == ("", "")
    policy = only(objects, "NetworkPolicy")["spec"]
    assert selects(
        policy["podSelector"]["matchLabels"], only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    )
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["ingress"]}
    # Progress comes from job controllers in the watched namespace; nothing goes back to job pods.
    (controllers,) = by_port["progress"]
    assert controllers["podSelector"] == {"matchLabels": {"kubeforge.dev/role": "controller"}}
    assert controllers["namespaceSelector"]["matchExpressions"][0]["values"] == ["kubeforge-system"]
    assert by_port["metrics"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }]  # fmt: skip
    assert by_port["health"] is None  # the kubelet's probes
    assert not [o for o in render(home=tmp_path) if o["kind"] == "NetworkPolicy"]


def test_watched_namespaces(tmp_path: Path) -> None:
    objects = render("watchNamespaces={team-a,team-b}", home=tmp_path)
    # The job rules and the Lease of leader election, in each watched namespace.
    assert sorted(
        (o["kind"], o["metadata"]["name"], o["metadata"]["namespace"])
        for o in objects
        if o["kind"] in ("Role", "RoleBinding")
    ) == sorted(
        (kind, name, ns)
        for kind in ("Role", "RoleBinding")
        for name in ("forge-operator", "forge-operator-leader-election")
        for ns in ("team-a", "team-b")
    )
    assert [a for a in container(objects)["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_cluster_wide(tmp_path: Path) -> None:
    namespaced = render(home=tmp_path)
    objects = render("clusterWide=true", "watchNamespaces={team-a}", home=tmp_path)
    # Only the Lease's Role, in the release namespace: where a cluster-wide operator keeps its Lease.
    assert [(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects
            if o["kind"] in ("Role", "RoleBinding")] == [
        ("Role", "forge-operator-leader-election", "kubeforge-system"),
        ("RoleBinding", "forge-operator-leader-election", "kubeforge-system"),
    ]  # fmt: skip
    args = container(objects)["args"]
    assert "--all-namespaces" in args and not [a for a in args if a.startswith("--namespace")]
    assert "--leader-election-namespace=kubeforge-system" in args
    # The same rules as the namespaced Role, granted everywhere.
    assert (
        only(objects, "ClusterRole", "forge-operator")["rules"] == only(namespaced, "Role", "forge-operator")["rules"]
    )
    binding = only(objects, "ClusterRoleBinding", "forge-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "forge-operator",
    }
    assert binding["subjects"][0]["name"] == "forge-operator"


def test_monitors(tmp_path: Path) -> None:
    assert not [o for o in render(home=tmp_path) if o["kind"] in ("ServiceMonitor", "PodMonitor")]
    objects = render("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true", home=tmp_path)
    metrics = only(objects, "Service", "forge-operator-metrics")
    monitor = only(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert not selects(
        monitor["spec"]["selector"]["matchLabels"], only(objects, "Service", "forge-operator")["metadata"]["labels"]
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    pod_monitor = only(objects, "PodMonitor")
    assert selects(
        pod_monitor["spec"]["selector"]["matchLabels"],
        only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"],
    )
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in container(objects)["ports"]}
    # Prometheus must keep the metrics' own job/namespace labels: the dashboards select by them.
    assert monitor["spec"]["endpoints"][0]["honorLabels"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"]
    jobs = only(render("metrics.jobPodMonitor.enabled=true", home=tmp_path), "PodMonitor")
    assert jobs["spec"]["selector"]["matchExpressions"] == [{"key": "kubeforge.dev/job", "operator": "Exists"}]
    endpoint = jobs["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "http" and endpoint["honorLabels"]  # the role pods' port (operator resources.py)
    with pytest.raises(AssertionError, match="needs metrics.service.enabled"):
        render("metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false", home=tmp_path)


def test_dashboards(tmp_path: Path) -> None:
    # A copy of the chart with one more dashboard: every dashboards/*.json is packaged, whatever is there.
    chart = tmp_path / "forge-operator"
    shutil.copytree(CHART, chart)
    (chart / "dashboards" / "extra.json").write_text(json.dumps({"title": "extra", "panels": []}))
    files = {p.name: p.read_text() for p in chart.glob("dashboards/*.json")}
    config_map = only(render(home=tmp_path, chart=chart), "ConfigMap", "forge-operator-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == files
    assert all(json.loads(text) for text in config_map["data"].values())

    elsewhere = render("dashboards.namespace=monitoring", "dashboards.label=dash", "dashboards.labelValue=yes",
                       home=tmp_path, chart=chart)  # fmt: skip
    moved = only(elsewhere, "ConfigMap")
    assert moved["metadata"]["namespace"] == "monitoring" and moved["metadata"]["labels"]["dash"] == "yes"
    assert not [o for o in render("dashboards.enabled=false", home=tmp_path, chart=chart) if o["kind"] == "ConfigMap"]


def test_the_charts_crd_is_crds_rljob_yaml(tmp_path: Path) -> None:
    crd = only(render(home=tmp_path), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == KEEP, "the CRD must carry helm.sh/resource-policy: keep"
    del crd["metadata"]["annotations"]
    source = yaml.safe_load((REPO / "crds" / "rljob.yaml").read_text())
    if crd != source:
        diff = difflib.unified_diff(
            yaml.safe_dump(source).splitlines(),
            yaml.safe_dump(crd).splitlines(),
            "crds/rljob.yaml",
            "chart",
            lineterm="",
        )
        pytest.fail(
            "helm/forge-operator/files/rljob.yaml differs from crds/rljob.yaml; run `make crd`:\n" + "\n".join(diff)
        )
    assert not [o for o in render("crds.install=false", home=tmp_path) if o["kind"] == "CustomResourceDefinition"]


def test_install_upgrade_uninstall_keep_the_crd_and_jobs(cluster: Path, namespace: str, tmp_path: Path) -> None:
    release, operator_namespace = f"fo-{uuid.uuid4().hex[:6]}", f"op-{uuid.uuid4().hex[:6]}"
    fullname = f"{release}-forge-operator"
    ext, apps, custom = client.ApiextensionsV1Api(), client.AppsV1Api(), client.CustomObjectsApi()

    def run(*args: str) -> str:
        return helm(*args, "--namespace", operator_namespace, kubeconfig=cluster, home=tmp_path)

    # The session's CRD was applied with kubectl-like calls; let this release adopt it, as a user
    # who applied crds/rljob.yaml first would (docs/install.md).
    ext.patch_custom_resource_definition(CRD_NAME, {"metadata": {
        "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": operator_namespace},
    }})  # fmt: skip
    notes = run("install", release, str(CHART), "--create-namespace", "--set", f"watchNamespaces={{{namespace}}}",
                "--wait")  # fmt: skip
    assert f"kubectl -n {namespace} get rlj" in notes, notes
    deployment = apps.read_namespaced_deployment(fullname, operator_namespace)
    # KWOK plays the kubelet, so the operator's (never pulled) pod still reports Ready.
    assert deployment.status.available_replicas == 1
    assert (
        client.RbacAuthorizationV1Api().read_namespaced_role_binding(fullname, namespace).subjects[0].name == fullname
    )
    assert ext.read_custom_resource_definition(CRD_NAME).metadata.annotations["helm.sh/resource-policy"] == "keep"

    job = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLJob", "metadata": {"name": "kept"},
           "spec": {"model": {"path": "/models/m"}}}  # fmt: skip
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)

    def signing_key() -> str:
        return client.CoreV1Api().read_namespaced_secret(f"{fullname}-token-key", operator_namespace).data["key"]

    key = signing_key()
    run("upgrade", release, str(CHART), "--reuse-values", "--set", "operator.verbose=true", "--wait")
    args = apps.read_namespaced_deployment(fullname, operator_namespace).spec.template.spec.containers[0].args
    assert "--verbose" in args, args
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "kept")
    # The upgrade read the key back: running jobs' tokens stay good.
    assert signing_key() == key

    out = run("uninstall", release, "--wait")  # --wait: returns once everything it deletes is gone
    assert CRD_NAME in out, f"helm should report the CRD as kept: {out}"
    with pytest.raises(ApiException) as gone:
        apps.read_namespaced_deployment(fullname, operator_namespace)
    assert gone.value.status == 404
    assert ext.read_custom_resource_definition(CRD_NAME).metadata.deletion_timestamp is None
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "kept")["metadata"]["name"] == "kept"
    assert signing_key() == key  # kept with the jobs it signs
    client.CoreV1Api().delete_namespace(operator_namespace)
