"""A real cluster for the operator's tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK GPU nodes, built from Go modules by testbed/build.sh and started by
testbed/start-cluster.sh. KWOK plays the kubelet of the fake GPU nodes: pods reach Running, and a
pod labelled kwok.kubeforge.dev/fail=true (or succeed=true) ends Failed (or Succeeded).
Beside them runs one real node (testbed/start-node.sh: kubelet, containerd, CNI, kube-proxy,
kube-router, CoreDNS, local-path-provisioner) that runs real containers; it is tainted, so only
pods that ask for it land there (test_real_node.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Operator, install_crd, start_cluster, stop_cluster
from kubernetes import client, config

NODES = 2  # x 8 GPUs each


@pytest.fixture(scope="session")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster's work dir: kubeconfig, cluster.env, logs/, node/ (testbed/start-cluster.sh)."""
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="session")
def cluster(cluster_dir: Path) -> Iterator[Path]:
    """Start the control plane and the real node once per session; yields the admin kubeconfig path."""
    workdir = cluster_dir
    try:
        kubeconfig = start_cluster(workdir, NODES, KUBEFORGE_REAL_NODE="1")
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        config.load_kube_config(str(kubeconfig))
        install_crd()
        yield kubeconfig
    finally:
        stop_cluster(workdir)


@pytest.fixture
def namespace(cluster: Path) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def operator(cluster: Path, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Operator]:
    op = Operator(cluster, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"--- operator log ---\n{op.log()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
