"""Every kubeforge metric: named `kubeforge_*`, labelled by the contract, documented in docs/metrics.md
(and nothing documented that no code defines); the controller's Job.record and the operator's per-job
series, read back from a real /metrics."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kubeforge.auth import Credentials
from kubeforge.contract import RoleContext
from kubeforge.serving import ROLE_LABELS, RoleServer
from kubeforge.validation import parse_job
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "metrics.md"
# Every module that defines metrics; the source scan below fails if one is missing here.
MODULES = (
    "kubeforge.serving",
    "kubeforge.controller.job",
    "kubeforge.trainer.api",
    "kubeforge.generator.metrics",
    "kubeforge.rewards.role",
    "kubeforge_operator.metrics",
)
DEFINITION = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"([^\"]+)\"")


def defined() -> dict[str, MetricWrapperBase]:
    """The metrics the modules register, by the name a PromQL query uses (counters with _total)."""
    for module in MODULES:
        importlib.import_module(module)
    found = {}
    for collector in list(REGISTRY._collector_to_names):  # no public way to list collectors
        if isinstance(collector, MetricWrapperBase):
            name = collector._name + ("_total" if collector._type == "counter" else "")
            found[name] = collector
    return found


def documented() -> dict[str, tuple[str, tuple[str, ...], str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| `kubeforge_"):  # | `name` | type | labels | exported by | meaning |
            name, kind, labels, exporter = (cell.strip().strip("`") for cell in line.split("|")[1:5])
            assert name not in rows, f"{name} is listed twice in docs/metrics.md"
            rows[name] = (kind, tuple(label.strip() for label in labels.split(",") if label.strip()), exporter)
    return rows


def test_every_metric_is_named_labelled_and_documented():
    metrics, docs = defined(), documented()
    for name, metric in metrics.items():
        assert name.startswith("kubeforge_"), name
        assert name in docs, f"{name} is not documented in docs/metrics.md"
        kind, labels, exporter = docs[name]
        assert (metric._type, metric._labelnames) == (kind, labels), f"{name}: docs/metrics.md says {kind} {labels}"
        if exporter == "operator":
            # Per-job series name the job by both; operator-wide ones carry neither.
            assert ("job" in labels) <= ("namespace" in labels), name
        else:
            assert labels[: len(ROLE_LABELS)] == ROLE_LABELS, f"{name} lacks the role labels {ROLE_LABELS}"
            role = "role" if exporter == "every role" else exporter
            assert name.startswith(f"kubeforge_{role}_"), f"{name} is exported by {exporter}"
    assert not set(docs) - set(metrics), f"documented but defined nowhere: {sorted(set(docs) - set(metrics))}"


def test_no_module_defines_metrics_unseen_by_the_check_above():
    """A metric defined in a module missing from MODULES would escape the documentation check."""
    names = {n.removesuffix("_total") for n in defined()}
    for path in [*(REPO / "runtime").rglob("*.py"), *(REPO / "operator").rglob("*.py")]:
        for name in DEFINITION.findall(path.read_text()):
            assert name.removesuffix("_total") in names, f"{path.relative_to(REPO)} defines {name}: add it to MODULES"


@pytest.fixture
def controller(minimal_job, tmp_path: Path) -> RoleServer:
    ctx = RoleContext(
        job="metrics-demo", namespace="team", role="controller", replica=0, spec=parse_job(minimal_job).spec,
        run_dir=tmp_path, credentials=Credentials.issue("controller"), http_host="127.0.0.1", http_port=0,
        weight_sync_addr="",
    )  # fmt: skip
    return RoleServer(ctx)


def scrape(server: RoleServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The role's /metrics through its own route: (sample name, labels but the contract's) -> value."""
    text = TestClient(server.app).get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("kubeforge_") or s.labels.get("job") != "metrics-demo":
                continue
            assert {k: s.labels[k] for k in ROLE_LABELS} == {
                "job": "metrics-demo", "namespace": "team", "role": "controller", "replica": "0"
            }  # fmt: skip
            extra = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ROLE_LABELS))
            samples[(s.name, extra)] = s.value
    return samples


def test_job_record_exports_the_apps_row(controller: RoleServer):
    from kubeforge.controller import Job

    job = Job(controller.ctx)
    row = {
        "step": 3, "policy_version": 3, "reward_mean": 0.25, "loss": 0.1, "generate_seconds": 1.5,
        "reward_seconds": 0.2, "train_seconds": 0.7, "sync_seconds": 0.3, "staleness_max": 1, "buffer_depth": 2,
        "episodes": {"trained": 96, "buffered": 32}, "sample": "'abc' -> 'abc'",
    }  # fmt: skip
    job.record(row)
    job.record({"step": 2, "eval_reward": 0.5, "eval_policy_version": 2})  # a late evaluation: progress stays
    got = scrape(controller)
    assert got[("kubeforge_controller_step", ())] == 3
    assert got[("kubeforge_controller_policy_version", ())] == 3
    assert got[("kubeforge_controller_reward_mean", ())] == 0.25
    assert got[("kubeforge_controller_held_out_reward", ())] == 0.5
    assert got[("kubeforge_controller_staleness", ())] == 1
    assert got[("kubeforge_controller_buffer_depth", ())] == 2
    assert got[("kubeforge_controller_episodes", (("state", "trained"),))] == 96
    for phase, seconds in (("generate", 1.5), ("reward", 0.2), ("train", 0.7), ("sync", 0.3)):
        assert got[("kubeforge_controller_phase_seconds_count", (("phase", phase),))] == 1
        assert got[("kubeforge_controller_phase_seconds_sum", (("phase", phase),))] == pytest.approx(seconds)
    assert not any(name.endswith("_created") for name, _ in got)
    assert (job.progress.step, job.progress.weight_sync_seconds) == (3, 0.3)


def test_operator_job_series_start_at_zero_and_go_with_the_job():
    from kubeforge_operator import metrics

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    metrics.observe_phase("ns-a", "job-1", "Running")
    metrics.observe_phase("ns-a", "job-2", "Running")
    metrics.pod_created("ns-a", "job-1", "trainer")
    assert value("kubeforge_operator_restarts_total", job="job-1", namespace="ns-a", role="trainer") == 0
    assert value("kubeforge_operator_pods_created_total", job="job-1", namespace="ns-a", role="trainer") == 1
    assert value("kubeforge_operator_jobs", namespace="ns-a", phase="Running") == 2
    assert value("kubeforge_operator_job_phase", job="job-1", namespace="ns-a", phase="Running") == 1
    assert value("kubeforge_operator_job_phase", job="job-1", namespace="ns-a", phase="Failed") == 0

    metrics.observe_phase("ns-a", "job-1", None)
    assert value("kubeforge_operator_jobs", namespace="ns-a", phase="Running") == 1
    assert value("kubeforge_operator_restarts_total", job="job-1", namespace="ns-a", role="trainer") is None
    assert value("kubeforge_operator_job_phase", job="job-1", namespace="ns-a", phase="Running") is None
    assert value("kubeforge_operator_job_phase", job="job-2", namespace="ns-a", phase="Running") == 1
    metrics.observe_phase("ns-a", "job-2", None)


DASHBOARDS = REPO / "helm" / "forge-operator" / "dashboards"


@pytest.mark.parametrize("name", ["rljob.json", "operator.json"])
def test_dashboards_read_documented_metrics_through_the_datasource_variable(name: str):
    dashboard = json.loads((DASHBOARDS / name).read_text())
    assert dashboard["schemaVersion"] >= 39  # Grafana 11
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    source = {"type": "prometheus", "uid": "${datasource}"}
    docs = documented()
    for panel in dashboard["panels"]:
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            used = set(re.findall(r"kubeforge_\w+", target["expr"]))
            assert used, target["expr"]
            for metric in used:
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert metric in docs or (base in docs and docs[base][0] == "histogram"), f"{name}: {metric}"
