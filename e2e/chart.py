"""The Helm chart (helm/forge-operator) from the tests: run the testbed's helm, render the chart,
and make a kubeconfig that authenticates as the chart's ServiceAccount. Used by test_helm.py and
test_rbac.py."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml
from cluster import REPO, TESTBED, clean_env
from kubernetes import client

CHART = REPO / "helm" / "forge-operator"


@functools.cache
def helm_binary() -> Path:
    """helm from the testbed cache (testbed/build.sh builds it with the control plane; instant when cached)."""
    built = subprocess.run([str(TESTBED / "build.sh")], env=clean_env(), capture_output=True, text=True, timeout=3600)
    if built.returncode != 0:
        raise RuntimeError(f"testbed/build.sh failed:\n{built.stderr[-4000:]}")
    return Path(built.stdout.strip().splitlines()[-1]) / "helm"


def helm(*args: str, kubeconfig: Path | None = None, home: Path) -> str:
    """Run helm with its config, cache and data under `home` (nothing from ~); stdout, or a clear error."""
    env = clean_env(
        HELM_CONFIG_HOME=str(home / "config"), HELM_CACHE_HOME=str(home / "cache"), HELM_DATA_HOME=str(home / "data")
    )
    cmd = [str(helm_binary()), *args, *(["--kubeconfig", str(kubeconfig)] if kubeconfig else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"`helm {' '.join(args)}` exited {done.returncode}:\n{done.stderr}{done.stdout}")
    return done.stdout


def render(*values: str, home: Path, namespace: str = "kubeforge-system", chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` with `--set` values; the rendered objects."""
    sets = [a for v in values for a in ("--set", v)]
    out = helm("template", "forge-operator", str(chart), "--namespace", namespace, *sets, home=home)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def service_account_kubeconfig(admin: Path, name: str, namespace: str, out: Path) -> Path:
    """A kubeconfig that authenticates as ServiceAccount namespace/name (a TokenRequest token), nothing else."""
    token = (
        client.CoreV1Api()
        .create_namespaced_service_account_token(name, namespace, {"spec": {"expirationSeconds": 3600}})
        .status.token
    )
    config = yaml.safe_load(admin.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    out.write_text(yaml.safe_dump(config))
    return out
