"""Helpers around the test control plane (testbed/): start and stop it, install the CRD, run
the operator as a real process. Used by e2e/conftest.py and bench/operator_bench.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "testbed"
GROUP, VERSION, PLURAL = "kubeforge.dev", "v1alpha1", "rljobs"


def clean_env(**extra: str) -> dict[str, str]:
    # Nothing inherited that changes how Go binaries or the operator load (LD_PRELOAD from vLLM, say).
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "KUBECONFIG")}
    return {**env, **extra}


def install_crd() -> None:
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
    """The operator as a real process (python -m kubeforge_operator) watching one namespace.

    Its leader-election identity stays the same across start() calls, as a pod's does when its container
    is restarted: a restarted operator takes its own Lease back at once."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, extra_args: tuple[str, ...] = ()):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.metrics_port = free_port()
        self.progress_port = free_port()
        self.identity = f"operator-{uuid.uuid4().hex[:8]}"
        self.extra_args = extra_args
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
                "--progress-listen",
                f"127.0.0.1:{self.progress_port}",
                "--progress-url-base",
                f"http://127.0.0.1:{self.progress_port}",
                "--leader-election-id",
                self.identity,
                *self.extra_args,
            ],  # fmt: skip
            env=clean_env(KUBECONFIG=str(self.kubeconfig)),
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


def start_cluster(workdir: Path, nodes: int, **env: str) -> Path:
    """Start the control plane under `workdir` with `nodes` KWOK GPU nodes; returns the kubeconfig."""
    started = subprocess.run(
        [str(TESTBED / "start-cluster.sh"), str(workdir), str(nodes)],
        env=clean_env(**env), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if started.returncode != 0:
        raise RuntimeError(f"the test control plane did not start:\n{started.stderr[-4000:]}")
    return Path(started.stdout.strip().splitlines()[-1])


def stop_cluster(workdir: Path) -> None:
    subprocess.run([str(TESTBED / "stop-cluster.sh"), str(workdir)], env=clean_env(), capture_output=True, timeout=120)


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
