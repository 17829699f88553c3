"""The operator works with exactly the chart's permissions (helm/forge-operator installed by helm),
and no more: it runs a job to the end with its ServiceAccount's token, and that token is refused
everything else."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from chart import CHART, helm, service_account_kubeconfig
from cluster import GROUP, PLURAL, VERSION, Operator, wait_for
from kubeforge import contract
from kubeforge.spec import RLJobSpec
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from storage import CLASS, instant_storage_class

pytestmark = pytest.mark.cluster

JOB = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "RLJob",
    "metadata": {"name": "grpo"},
    "spec": {
        "model": {"path": "/models/m"},
        "roles": {"trainer": {"nodes": 2, "gpusPerNode": 2}, "generator": {"replicas": 2, "gpus": 1}},
        # The operator creates this claim with the chart's RBAC (persistentvolumeclaims: create).
        "checkpoint": {"storage": {"storageClassName": CLASS, "accessMode": "ReadWriteMany"}},
    },
}


def _forbidden(what: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except ApiException as e:
        assert e.status == 403, f"{what}: expected 403 Forbidden, got {e.status} {e.reason}"
        return
    raise AssertionError(f"{what}: the operator's ServiceAccount was allowed to")


def _assert_nothing_else_allowed(api: client.ApiClient, job_namespace: str, operator_namespace: str) -> None:
    core, ext = client.CoreV1Api(api), client.ApiextensionsV1Api(api)
    # The token works (so the refusals below are RBAC's): read what the chart grants.
    node = core.list_node().items[0].metadata.name
    assert client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, job_namespace, PLURAL, "grpo")
    # Destructive calls use server-side dry run: authorization is checked all the same.
    pod = {"metadata": {"name": "intruder"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    _forbidden("list Secrets in another namespace", lambda: core.list_namespaced_secret("default"))
    _forbidden("list Secrets in its own job namespace", lambda: core.list_namespaced_secret(job_namespace))
    # Item 19: not even its jobs' own token Secrets (tokens are derived from its key, never read back).
    for secret in ("grpo-token", "anything"):
        _forbidden(
            f"read Secret {secret} in its job namespace", lambda s=secret: core.read_namespaced_secret(s, job_namespace)
        )
    _forbidden(
        "create a pod in an unwatched namespace", lambda: core.create_namespaced_pod("default", pod, dry_run="All")
    )
    _forbidden("label a node", lambda: core.patch_node(node, {"metadata": {"labels": {"x": "y"}}}, dry_run="All"))
    _forbidden("delete the RLJob CRD",
               lambda: ext.delete_custom_resource_definition("rljobs.kubeforge.dev", dry_run="All"))  # fmt: skip
    _forbidden("delete its own namespace", lambda: core.delete_namespace(operator_namespace, dry_run="All"))


def test_the_operator_runs_a_job_with_only_the_charts_rbac(cluster: Path, namespace: str, tmp_path: Path) -> None:
    release, operator_namespace = f"fo-{uuid.uuid4().hex[:6]}", f"op-{uuid.uuid4().hex[:6]}"
    home = tmp_path / "helm"
    # The session fixture already installed the CRD; this release only brings the operator's objects.
    helm("install", release, str(CHART), "--namespace", operator_namespace, "--create-namespace",
         "--set", f"watchNamespaces={{{namespace}}}", "--set", "crds.install=false",
         kubeconfig=cluster, home=home)  # fmt: skip
    try:
        kubeconfig = service_account_kubeconfig(
            cluster, f"{release}-forge-operator", operator_namespace, tmp_path / "operator.kubeconfig"
        )
        operator = Operator(kubeconfig, namespace, tmp_path / "operator.log")
        operator.start()
        try:
            custom, core = client.CustomObjectsApi(), client.CoreV1Api()
            instant_storage_class()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JOB)

            def status() -> dict[str, Any]:
                return (
                    custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "grpo").get("status") or {}
                )

            def pod_phases() -> dict[str, str]:
                pods = core.list_namespaced_pod(namespace, label_selector="kubeforge.dev/job=grpo").items
                return {p.metadata.name: p.status.phase for p in pods}

            wait_for("phase Running", lambda: status().get("phase") == "Running", timeout=90, operator=operator)
            expected = {f"grpo-{i.name}" for i in contract.instances(RLJobSpec.model_validate(JOB["spec"]))}
            wait_for("every pod of the job Running", lambda: pod_phases() == dict.fromkeys(expected, "Running"))

            uid = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "grpo")["metadata"]["uid"]
            secret = core.read_namespaced_secret(f"grpo-token-{uid[:8]}", namespace)
            token = base64.b64decode(secret.data["controller"]).decode()
            url = f"http://127.0.0.1:{operator.progress_port}/progress/{namespace}/grpo"
            assert httpx.post(url, json={"step": 3}, headers={"Authorization": f"Bearer {token}"}).status_code == 200

            core.patch_namespaced_pod(
                "grpo-controller-0", namespace, {"metadata": {"labels": {"kwok.kubeforge.dev/succeed": "true"}}}
            )
            wait_for("phase Succeeded", lambda: status().get("phase") == "Succeeded", timeout=90, operator=operator)
            assert status()["progress"]["step"] == 3
            assert core.list_namespaced_persistent_volume_claim(
                namespace, label_selector="kubeforge.dev/job=grpo"
            ).items
        finally:
            operator.stop()
        log = operator.log()
        assert "Forbidden" not in log and "403" not in log, log
        _assert_nothing_else_allowed(config.new_client_from_config(str(kubeconfig)), namespace, operator_namespace)
    finally:
        helm("uninstall", release, "--namespace", operator_namespace, "--wait", kubeconfig=cluster, home=home)
        client.CoreV1Api().delete_namespace(operator_namespace)
