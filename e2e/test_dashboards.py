"""The Grafana dashboards against a real Prometheus: every panel's PromQL returns data.

A real Prometheus (Debian's, unpacked by testbed/prometheus.sh) scrapes, every second, the roles
of a short example GRPO job run by `kubeforge run` and the operator of the test control plane.
The same RLJob (name and namespace) is also applied to the cluster, so that the operator's
per-job series (restarts, phase) exist for it as they would for a job the operator runs. Then
every expression of both dashboards, template variables filled in as Grafana would, is run over
the job's lifetime through Prometheus's HTTP API: a panel that queries a metric nobody exports
returns nothing and fails the test.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cluster import GROUP, PLURAL, REPO, TESTBED, VERSION, Operator, free_port, wait_for
from kubeforge import contract
from kubeforge.spec import RLJobSpec
from kubeforge.tiny_model import write_tiny_model
from kubernetes import client

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]

DASHBOARDS = REPO / "helm" / "forge-operator" / "dashboards"
SCRAPE_SECONDS = 1
JOB_NAME = "dash"
# What Grafana substitutes with a 1 s scrape interval: $__rate_interval is 4 scrape intervals.
BUILTINS = {"$__rate_interval": f"{4 * SCRAPE_SECONDS}s", "$__interval": f"{SCRAPE_SECONDS}s"}


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    done = subprocess.run([str(TESTBED / "prometheus.sh")], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"testbed/prometheus.sh failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_range(n: int) -> int:
    """A base port with the `n` ports from it free (the launcher's --port-base checks them again)."""
    for base in range(23100, 40000, 97):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


class Prometheus:
    def __init__(self, binary: Path, workdir: Path, targets: dict[str, list[str]]):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.workdir = workdir
        # honor_labels: the metrics' own `job` label (the RLJob) wins over the scrape job's name.
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "scrape_configs": [
                {"job_name": name, "honor_labels": True, "static_configs": [{"targets": hosts}]}
                for name, hosts in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [
                str(binary),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for("Prometheus ready", self._ready, timeout=60)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = reply.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", []) if t.get("expr")]
    return found


def fill(expr: str, variables: dict[str, str]) -> str:
    for name, value in {**BUILTINS, **variables}.items():
        expr = expr.replace(f"${{{name.lstrip('$')}}}", value).replace(name, value)
    assert "$" not in expr, f"a template variable is left in {expr!r}"
    return expr


def job_file(tmp_path: Path, model: Path, namespace: str) -> tuple[Path, dict[str, Any]]:
    """apps/grpo/tiny.yaml, shortened (a few steps, a short warm-up), as the RLJob `dash` in `namespace`."""
    body = yaml.safe_load((REPO / "apps" / "grpo" / "tiny.yaml").read_text())
    body["metadata"] = {"name": JOB_NAME, "namespace": namespace}
    body["spec"]["model"]["path"] = str(model)
    body["spec"]["steps"] = 4
    body["spec"]["algorithm"].update(warmupSteps=2, evalEvery=2, promptsPerStep=8, groupSize=4)
    path = tmp_path / "dash.yaml"
    path.write_text(yaml.safe_dump(body))
    return path, body


@pytest.fixture
def example_job(tmp_path: Path, namespace: str, operator: Operator, prometheus_bin: Path) -> Iterator[dict[str, Any]]:
    """Prometheus scraping the operator and a finished short example job; yields what the queries need."""
    model = write_tiny_model(tmp_path / "tiny-qwen3", seed=0)
    path, body = job_file(tmp_path, model, namespace)
    client.CustomObjectsApi().create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    instances = contract.instances(RLJobSpec.model_validate(body["spec"]))
    base = free_range(len(instances) + 2)  # + torchrun's master and the weight-sync store
    roles = [f"127.0.0.1:{base + i}" for i in range(len(instances))]  # launcher.allocate_ports' order
    prometheus = Prometheus(
        prometheus_bin, tmp_path, {"roles": roles, "operator": [f"127.0.0.1:{operator.metrics_port}"]}
    )
    log = tmp_path / "job.log"
    try:
        started = time.time()
        with log.open("w") as out:
            done = subprocess.run(
                [sys.executable, "-m", "kubeforge.cli", "run", str(path), "--run-dir", str(tmp_path / "run"),
                 "--port-base", str(base), "--no-color"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1200,
            )  # fmt: skip
        ended = time.time()
        assert done.returncode == 0, log.read_text()[-6000:]
        time.sleep(3 * SCRAPE_SECONDS)  # the operator's last scrapes
        yield {"prometheus": prometheus, "namespace": namespace, "start": started, "end": ended + 2}
    finally:
        prometheus.stop()


def test_every_dashboard_query_returns_data(example_job: dict[str, Any]) -> None:
    prometheus: Prometheus = example_job["prometheus"]
    start, end = example_job["start"], example_job["end"]
    variables = {
        "$datasource": "prometheus",
        "$namespace": example_job["namespace"],
        "$job": JOB_NAME,
        "$__range": f"{math.ceil(end - start)}s",
    }
    scraped = prometheus.api("targets")["activeTargets"]
    assert all(t["health"] == "up" for t in scraped if t["labels"]["job"] == "operator"), scraped

    empty = []
    for name in ("rljob.json", "operator.json"):
        dashboard = json.loads((DASHBOARDS / name).read_text())
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            # label_values(SELECTOR, LABEL) is Grafana's; ask Prometheus the same question.
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"]).groups()
            values = prometheus.api(f"label/{label}/values", **{"match[]": fill(selector, variables)},
                                    start=start, end=end)  # fmt: skip
            assert variables[f"${var['name']}"] in values, f"{name}: variable {var['name']} offers {values}"
        for title, expr in expressions(dashboard):
            query = fill(expr, variables)
            result = prometheus.api("query_range", query=query, start=start, end=end, step=SCRAPE_SECONDS)["result"]
            finite = [v for series in result for _, v in series["values"] if math.isfinite(float(v))]
            if not finite:
                empty.append(f"{name} / {title}: {query}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
