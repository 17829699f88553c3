"""The operator works with exactly the permissions in operator/rbac.yaml, and no more."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from cluster import GROUP, PLURAL, REPO, VERSION, Operator, wait_for
from kubernetes import client, utils

pytestmark = pytest.mark.cluster


def _apply_rbac(operator_namespace: str, job_namespace: str) -> None:
    text = (REPO / "operator" / "rbac.yaml").read_text()
    text = text.replace("OPERATOR_NAMESPACE", operator_namespace).replace("JOB_NAMESPACE", job_namespace)
    api = client.ApiClient()
    for doc in yaml.safe_load_all(text):
        utils.create_from_dict(api, doc)


def _service_account_kubeconfig(admin: Path, namespace: str, out: Path) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a TokenRequest token)."""
    token = (
        client.CoreV1Api()
        .create_namespaced_service_account_token("forge-operator", namespace, {"spec": {"expirationSeconds": 3600}})
        .status.token
    )
    config = yaml.safe_load(admin.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    out.write_text(yaml.safe_dump(config))
    return out


def test_the_operator_runs_a_job_with_only_its_rbac(cluster: Path, namespace: str, tmp_path: Path) -> None:
    operator_namespace = f"op-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api().create_namespace({"metadata": {"name": operator_namespace}})
    _apply_rbac(operator_namespace, namespace)
    kubeconfig = _service_account_kubeconfig(cluster, operator_namespace, tmp_path / "operator.kubeconfig")
    operator = Operator(kubeconfig, namespace, tmp_path / "operator.log")
    operator.start()
    try:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RLJob",
            "metadata": {"name": "grpo"},
            "spec": {"model": {"path": "/models/m"}, "roles": {"trainer": {"gpusPerNode": 2}}},
        }
        custom = client.CustomObjectsApi()
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        def status():
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "grpo").get("status") or {}  # noqa: E731

        wait_for("phase Running", lambda: status().get("phase") == "Running", timeout=90, operator=operator)

        token = base64.b64decode(
            client.CoreV1Api().read_namespaced_secret("grpo-token", namespace).data["token"]
        ).decode()
        url = f"http://127.0.0.1:{operator.progress_port}/progress/{namespace}/grpo"
        assert httpx.post(url, json={"step": 3}, headers={"Authorization": f"Bearer {token}"}).status_code == 200

        client.CoreV1Api().patch_namespaced_pod(
            "grpo-controller-0", namespace, {"metadata": {"labels": {"kwok.kubeforge.dev/succeed": "true"}}}
        )
        wait_for("phase Succeeded", lambda: status().get("phase") == "Succeeded", timeout=90, operator=operator)
        assert status()["progress"]["step"] == 3
    finally:
        operator.stop()
    log = operator.log()
    assert "Forbidden" not in log and "403" not in log, log
