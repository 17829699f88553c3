"""The operator's Prometheus metrics (served on --metrics-port; see kubeforge_operator.__main__).

Per-job series carry `job` and `namespace` (the RLJob's), like the runtime's metrics, and go
when the RLJob goes. Reconcile latency has no per-job labels: a histogram per job would cost a
dozen series for each of thousands of jobs, and the latency is the operator's, not the job's.
"""

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

JOB_LABELS = ("job", "namespace")
PHASES = ("Pending", "Starting", "Running", "Restarting", "Succeeded", "Failed", "Suspended")

# No `<counter>_created` series beside each counter and histogram: one series per metric is enough.
disable_created_metrics()

RECONCILE_SECONDS = Histogram(
    "kubeforge_operator_reconcile_seconds",
    "Time to reconcile one RLJob once.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("kubeforge_operator_reconcile_errors_total", "Reconcile passes that raised.", JOB_LABELS)
PODS_CREATED = Counter("kubeforge_operator_pods_created_total", "Pods the operator created.", (*JOB_LABELS, "role"))
RESTARTS = Counter(
    "kubeforge_operator_restarts_total",
    "Restarts ordered by the failure policy, by failed role.",
    (*JOB_LABELS, "role"),
)
JOBS = Gauge("kubeforge_operator_jobs", "RLJobs by phase.", ("namespace", "phase"))
JOB_PHASE = Gauge(
    "kubeforge_operator_job_phase", "1 for the RLJob's current phase, 0 for the others.", (*JOB_LABELS, "phase")
)

_phases: dict[tuple[str, str], str] = {}


def pod_created(namespace: str, name: str, role: str) -> None:
    """Count a created pod; its role's restarts start at zero (a panel shows 0, not no data)."""
    PODS_CREATED.labels(job=name, namespace=namespace, role=role).inc()
    RESTARTS.labels(job=name, namespace=namespace, role=role)


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone, and so are its series) and refresh the per-phase gauges."""
    key = (namespace, name)
    if phase is None:
        _phases.pop(key, None)
        for metric in (RECONCILE_ERRORS, PODS_CREATED, RESTARTS, JOB_PHASE):
            metric.remove_by_labels({"job": name, "namespace": namespace})
    else:
        _phases[key] = phase
        for p in PHASES:
            JOB_PHASE.labels(job=name, namespace=namespace, phase=p).set(int(p == phase))
    for p in PHASES:
        JOBS.labels(namespace=namespace, phase=p).set(
            sum(1 for k, v in _phases.items() if k[0] == namespace and v == p)
        )
