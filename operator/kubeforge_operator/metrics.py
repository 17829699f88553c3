"""The operator's Prometheus metrics (served on its own port; see kubeforge_operator.main)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "kubeforge_operator_reconcile_seconds",
    "Time to reconcile one RLJob once.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("kubeforge_operator_reconcile_errors_total", "Reconcile passes that raised.")
PODS_CREATED = Counter("kubeforge_operator_pods_created_total", "Pods the operator created.", ["role"])
RESTARTS = Counter("kubeforge_operator_restarts_total", "Restarts ordered by the failure policy.", ["role"])
JOBS = Gauge("kubeforge_operator_jobs", "RLJobs by phase.", ["phase"])

_phases: dict[tuple[str, str], str] = {}


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone) and refresh the per-phase gauge."""
    key = (namespace, name)
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
    for p in ("Pending", "Starting", "Running", "Restarting", "Succeeded", "Failed", "Suspended"):
        JOBS.labels(phase=p).set(sum(1 for v in _phases.values() if v == p))
