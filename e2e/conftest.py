"""A real control plane for the operator's tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK GPU nodes, built from Go modules by testbed/build.sh and started by
testbed/start-cluster.sh on 127.0.0.1. KWOK plays the kubelet: pods reach Running, and a pod
labelled kwok.kubeforge.dev/fail=true (or succeed=true) ends Failed (or Succeeded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed"
NODES = 2  # x 8 GPUs each
GROUP, VERSION, PLURAL = "kubeforge.dev", "v1alpha1", "rljobs"


def _clean_env(**extra: str) -> dict[str, str]:
    # Nothing inherited that changes how Go binaries or the operator load (LD_PRELOAD from vLLM, say).
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "KUBECONFIG")}
    return {**env, **extra}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start the control plane once per session; yields the admin kubeconfig path."""
    workdir = tmp_path_factory.mktemp("cluster")
    started = subprocess.run(
        [str(TESTBED / "start-cluster.sh"), str(workdir), str(NODES)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if started.returncode != 0:
        pytest.fail(f"the test control plane did not start:\n{started.stderr[-4000:]}")
    kubeconfig = Path(started.stdout.strip().splitlines()[-1])
    try:
        config.load_kube_config(str(kubeconfig))
        _install_crd()
        yield kubeconfig
    finally:
        subprocess.run([str(TESTBED / "stop-cluster.sh"), str(workdir)], env=_clean_env(), timeout=120)


def _install_crd() -> None:
    ext = client.ApiextensionsV1Api()
    crd = yaml.safe_load((REPO / "crds" / "rljob.yaml").read_text())
    ext.create_custom_resource_definition(crd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = ext.read_custom_resource_definition(crd["metadata"]["name"])
        if any(c.type == "Established" and c.status == "True" for c in (got.status.conditions or [])):
            return
        time.sleep(0.2)
    raise AssertionError("the RLJob CRD was never Established")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    """The operator as a real process (python -m kubeforge_operator) watching one namespace."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubeforge_operator",
                "-n",
                self.namespace,
                "--metrics-port",
                str(self.metrics_port),
                "--liveness",
                f"http://127.0.0.1:{free_port()}/healthz",
            ],
            env=_clean_env(KUBECONFIG=str(self.kubeconfig)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


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


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, operator: Operator | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (with the operator's log)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    extra = f"\n--- operator log ---\n{operator.log()}" if operator else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}{extra}")
