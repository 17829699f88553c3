"""Level-triggered reconciliation of one RLJob: read what exists, compute what should, converge.

`Reconciler.reconcile` is idempotent: run it twice on an unchanged world and the second run
changes nothing. It never creates children for a job in a terminal phase. Restarts follow
spec.failurePolicy; each handled pod failure is counted once, in status. A pod that does not start
(kubeforge_operator.stuck) is named in status and in one Event; a start that takes longer than
spec.startupDeadlineSeconds (kubeforge_operator.startup) fails the job. A job with
`scheduling.gang: capacity` gets its first pods only once the capacity gate admits it
(kubeforge_operator.capacity, the policy; kubeforge_operator.inventory, the admissions): it holds its
admission until it finishes, is suspended or is gone.

Events follow the status write: a pass posts its Events only once its status patch is stored.
The status is what later passes compare with to decide whether an Event is due, so an Event whose
status was lost would be posted again, and one posted before a failed write would speak of a
state nobody can read.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubeforge import contract
from kubeforge.contract import Instance
from kubeforge.failure_policy import Counters, Failure, Observed, plan_failure
from kubeforge.spec import API_GROUP, API_VERSION, PLURAL, RLJobSpec
from kubeforge.validation import SpecError, parse_spec
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeforge_operator import inventory, metrics, startup, stuck
from kubeforge_operator import resources as r
from kubeforge_operator.api import REQUEST_TIMEOUT
from kubeforge_operator.signing import Signer

log = logging.getLogger("kubeforge_operator")

TERMINAL = ("Succeeded", "Failed")
# Phases in which a job holds no capacity admission: its pods are gone, or going.
RELEASED = (*TERMINAL, "Suspended")
# The reason of a refusal to use a `<job>-spec` ConfigMap this RLJob does not own.
FOREIGN = "ForeignObject"
# The reason of the Event about a job pod whose labels the operator cannot read (it is ignored).
UNREADABLE_POD = "UnreadablePod"

# Post a Kubernetes Event: (type, reason, message).
EventSink = Callable[[str, str, str], None]


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    return _format_time(datetime.now(UTC))


def _format_time(time: datetime) -> str:
    return time.strftime(TIME_FORMAT)


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


class CreateRefused(Exception):
    """The API server refused to create a child for good (admission, quota, an invalid object)."""

    def __init__(self, diagnosis: stuck.Diagnosis):
        super().__init__(diagnosis.describe())
        self.diagnosis = diagnosis


def _raise_if_refused(kind: str, name: str, error: ApiException) -> None:
    """Raise CreateRefused when a create failed for good; a transient error is left to the caller."""
    diagnosis = stuck.refused(kind, name, error)
    if diagnosis:
        raise CreateRefused(diagnosis) from error


class UnreadablePod(ValueError):
    """A pod with the job's label whose role or replica label the operator cannot read."""


@dataclass
class PodView:
    """What the reconciler needs to know about one existing pod."""

    name: str
    instance: Instance
    phase: str
    ready: bool
    terminating: bool
    gated: bool = False  # waits at a scheduling gate: queued (Kueue), holding no node
    diagnosis: stuck.Diagnosis | None = None  # why it does not start, when it is stuck
    exit_code: int | None = None
    reason: str | None = None
    message: str = ""

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodView | None:
        """From a pod as the API server sends it (camelCase JSON, not a client model)."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if r.LABEL_ROLE not in labels or r.LABEL_REPLICA not in labels:
            return None
        replica = labels[r.LABEL_REPLICA]
        if not (isinstance(replica, str) and replica.isascii() and replica.isdigit()):
            raise UnreadablePod(f"label {r.LABEL_REPLICA}={replica!r} is not a replica number")
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        view = cls(
            name=meta["name"],
            instance=Instance(labels[r.LABEL_ROLE], int(replica)),
            phase=status.get("phase") or "Pending",
            ready=conditions.get("Ready") == "True",
            terminating=meta.get("deletionTimestamp") is not None,
            gated=bool((pod.get("spec") or {}).get("schedulingGates")),
            diagnosis=stuck.diagnose_pod(pod),
        )
        for cs in status.get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated is not None:
                view.exit_code, view.reason, view.message = (
                    terminated.get("exitCode"),
                    terminated.get("reason"),
                    terminated.get("message") or "",
                )
        return view

    def failure(self) -> Failure:
        """This pod's failure, as the failure policy reads it."""
        return Failure(self.instance, self.name, self.exit_code, self.reason, _last_words(self.message))

    @property
    def failed(self) -> bool:
        # A role other than the controller never finishes on its own: exiting at all is a failure.
        return self.phase == "Failed" or (self.phase == "Succeeded" and self.instance.role != "controller")


def _last_words(message: str) -> dict[str, Any]:
    """A role's termination message is the JSON it wrote to KUBEFORGE_TERMINATION_LOG."""
    try:
        value = json.loads(message)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class Status:
    """The status being computed in one pass; only what changed is patched."""

    current: dict[str, Any]
    patch: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.patch.get(key, self.current.get(key, default))

    def set(self, key: str, value: Any) -> None:
        if self.current.get(key) != value:
            self.patch[key] = value

    def condition(self, type_: str, ok: bool, reason: str, message: str) -> None:
        conditions = [dict(c) for c in self.get("conditions", [])]
        status = "True" if ok else "False"
        for c in conditions:
            if c["type"] == type_:
                if (c["status"], c.get("reason"), c.get("message")) != (status, reason, message):
                    if c["status"] != status:
                        c["lastTransitionTime"] = now()
                    c.update(status=status, reason=reason, message=message)
                break
        else:
            conditions.append(
                {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": now()}
            )
        self.set("conditions", conditions)


class Reconciler:
    def __init__(
        self,
        core: client.CoreV1Api,
        net: client.NetworkingV1Api,
        custom: client.CustomObjectsApi,
        progress_url_base: str = "",
        scraper: r.Scraper | None = None,
        gate: inventory.Gate | None = None,
        signer: Signer | None = None,
    ):
        self.core = core
        self.net = net
        self.custom = custom
        self.progress_url_base = progress_url_base
        self.scraper = scraper
        # The operator passes a gate over its watch-fed inventory; without one (tools, tests) each decision
        # lists the cluster's nodes and pods.
        self.gate = gate or inventory.Gate(lambda: inventory.listed(core))
        # The operator passes the signer of its key file; without one (tools, tests) a key of this process
        # only, whose tokens no progress receiver elsewhere can check.
        self.signer = signer or Signer(secrets.token_bytes(32))
        # The uids of unreadable pods already reported: one log line and one Event per pod.
        self._reported_pods: set[str] = set()

    # -- entry ---------------------------------------------------------------------------------

    def reconcile(self, body: dict[str, Any], event: EventSink) -> str | None:
        """One pass; the resourceVersion of the RLJob after its status patch, None if nothing was patched."""
        meta = body["metadata"]
        job = r.JobRef(meta["name"], meta["namespace"], meta["uid"])
        status = Status(dict(body.get("status") or {}))
        errors = metrics.RECONCILE_ERRORS.labels(job=job.name, namespace=job.namespace)  # zero until one happens
        events: list[tuple[str, str, str]] = []
        with metrics.RECONCILE_SECONDS.time():
            try:
                self._reconcile(job, body, status, lambda *e: events.append(e))
            except Exception:
                errors.inc()
                raise
            finally:
                if status.get("phase") in RELEASED:
                    self.gate.release(job)  # its pods are deleted: their GPUs are no longer held for it
                written = None
                if status.patch:
                    written = self._patch_status(job, status.patch)  # raises: no Event is posted
                    if "phase" in status.patch:
                        metrics.observe_phase(job.namespace, job.name, status.patch["phase"])
                if written is not None or not status.patch:
                    for e in events:
                        event(*e)
        return written

    def _reconcile(self, job: r.JobRef, body: dict[str, Any], status: Status, event: EventSink) -> None:
        phase = status.get("phase")
        pods = self._pods(job, event)

        if phase in TERMINAL:
            # Terminal jobs keep their status and never get children back; stop what still runs.
            self._delete_pods(job, [p for p in pods if not p.terminating and p.phase not in ("Succeeded", "Failed")])
            self._expire(job, body, status)
            return

        try:
            spec = parse_spec(body.get("spec"), source=f"{job.namespace}/{job.name}")
        except SpecError as e:
            self.gate.release(job)
            message = "; ".join(e.problems)
            status.condition("SpecValid", False, "InvalidSpec", message)
            self._transition(status, "Failed", f"invalid spec: {message}", event, warning=True)
            return
        status.condition("SpecValid", True, "Valid", "")

        if spec.suspend:
            self._delete_pods(job, [p for p in pods if not p.terminating])
            self._count(spec, [], status)
            # As for a Kubernetes Job, activeDeadlineSeconds stops while suspended and counts again
            # from the resume; the startup deadline starts again too.
            status.set("startTime", None)
            status.set("startingSince", None)
            self._report_stuck(status, None, event)
            self._transition(status, "Suspended", "spec.suspend is true; pods deleted", event)
            return

        deadline = spec.active_deadline_seconds
        started = status.get("startTime")
        if deadline and started and (datetime.now(UTC) - _parse_time(started)).total_seconds() > deadline:
            self._delete_pods(job, [p for p in pods if not p.terminating])
            self._finish(status, "Failed", f"activeDeadlineSeconds ({deadline} s) exceeded", event)
            return

        controller = next((p for p in pods if p.instance.role == "controller" and not p.terminating), None)
        if controller and controller.phase == "Succeeded":
            last_words = _last_words(controller.message)
            if isinstance(last_words.get("progress"), dict):
                status.set("progress", last_words["progress"])
            self._delete_pods(job, [p for p in pods if p is not controller and not p.terminating])
            self._finish(status, "Succeeded", "the controller finished the RL loop", event)
            return

        if self._handle_failures(job, spec, pods, status, event):
            return

        desired = contract.instances(spec)
        # Replicas removed from the spec (scaled down): their pods go.
        self._delete_pods(job, [p for p in pods if p.instance not in desired and not p.terminating])
        live = {p.instance for p in pods if not p.terminating}
        going = {p.instance for p in pods if p.terminating}  # recreated once the old pod is gone
        missing = [i for i in desired if i not in live and i not in going]
        if spec.scheduling.gang != "capacity":
            self.gate.release(job)
        elif missing and not live:
            # One decision at a time, counting the pods of every job admitted before: see kubeforge_operator.inventory.
            shortfall = self.gate.admit(job, spec)
            if shortfall:
                status.condition("Scheduled", False, "InsufficientGPUs", shortfall)
                status.set("startingSince", None)  # no pod holds a GPU while the gate waits
                self._transition(status, "Pending", f"waiting for GPUs: {shortfall}", event)
                return
        else:
            self.gate.hold(job, spec)  # its pods exist (also after an operator restart); its spec may have grown

        ready = self._count(spec, pods, status)
        live_pods = [p for p in pods if not p.terminating]
        since = status.get("startingSince")
        clock = startup.tick(
            _parse_time(since) if since else None,
            spec.startup_deadline_seconds,
            all_ready=ready == len(desired),
            queued=any(p.gated for p in live_pods),
            now=datetime.now(UTC),
        )
        if clock.expired:
            assert spec.startup_deadline_seconds is not None  # tick never expires without a deadline
            not_ready = self._not_ready(job, desired, live_pods, stuck.Diagnosis.from_status(status.get("stuck")))
            self._delete_pods(job, [p for p in live_pods if p.phase not in ("Succeeded", "Failed")])
            self._finish(
                status, "Failed", startup.explain(spec.startup_deadline_seconds, ready, len(desired), not_ready), event
            )
            return
        status.set("startingSince", _format_time(clock.since) if clock.since else None)

        refusal: stuck.Diagnosis | None = None
        spec_written = False
        if missing:
            # Only on the way to creating pods: most passes (pod status changes) need none of this.
            try:
                spec_written = self._ensure_shared_objects(job, spec)
                missing_scheduler = self._ensure_pod_group(job, spec)
            except CreateRefused as e:
                refusal, missing_scheduler = e.diagnosis, ""
            if missing_scheduler:
                status.condition("Scheduled", False, "GangSchedulerMissing", missing_scheduler)
                status.set("startingSince", None)
                self._transition(status, "Pending", missing_scheduler, event, warning=True)
                return
        if refusal is None:
            # Before any pod is created: a new pod reads the spec of this generation.
            self._follow_spec_edits(job, spec, body["metadata"].get("generation"), status, spec_written)
        status.condition("Scheduled", True, "Capacity", "")
        if missing and refusal is None:
            refusal = self._create_pods(job, spec, missing, status.get("restartsByInstance", {}))

        if not status.get("startTime"):
            status.set("startTime", now())
        if status.get("restarts") is None:
            status.set("restarts", 0)
        if ready == len(desired):
            self._report_stuck(status, None, event)
            self._transition(status, "Running", "every role is ready", event)
            return
        # A refused create first: it is why a pod is missing. Then the first stuck pod in start order.
        by_instance = {p.instance: p for p in live_pods}
        diagnosis = refusal or next(
            (p.diagnosis for i in desired if (p := by_instance.get(i)) and p.diagnosis and not p.ready), None
        )
        self._report_stuck(status, diagnosis, event)
        message = f"{ready} of {len(desired)} pods ready"
        if diagnosis:
            message += f"; {diagnosis.describe()}"
        elif clock.since is None:
            message += "; queued: pods wait at a scheduling gate"
        waiting = "Restarting" if status.get("phase") == "Restarting" else "Starting"
        self._transition(status, waiting, message, event)

    def _create_pods(
        self, job: r.JobRef, spec: RLJobSpec, missing: list[Instance], incarnations: dict[str, int]
    ) -> stuck.Diagnosis | None:
        """Create the missing pods; the first refusal if the API server refused any (it is asked for all)."""
        refusal = None
        for inst in missing:
            try:
                self._create(r.pod(job, spec, inst, incarnations.get(inst.name, 0), self.progress_url_base))
            except CreateRefused as e:
                refusal = refusal or e.diagnosis
                continue
            metrics.pod_created(job.namespace, job.name, inst.role)
        return refusal

    def _not_ready(
        self, job: r.JobRef, desired: list[Instance], live_pods: list[PodView], last: stuck.Diagnosis | None
    ) -> list[tuple[str, str]]:
        """(pod, why) for every desired pod that is not Ready, in start order."""
        by_instance = {p.instance: p for p in live_pods}
        # A missing pod: the refusal the last pass recorded says why (a quota refuses them all alike).
        refused = f": {last.describe()}" if last and last.reason == FOREIGN else ""
        refused = refused or (f": {last.why()}" if last and last.reason.startswith("Create") else "")
        not_ready = []
        for inst in desired:
            name, p = job.pod_name(inst), by_instance.get(inst)
            if p is None:
                not_ready.append((name, f"not created{refused}"))
            elif not p.ready:
                why = p.diagnosis.why() if p.diagnosis else ("running, not ready" if p.phase == "Running" else p.phase)
                not_ready.append((name, why))
        return not_ready

    # -- failures ------------------------------------------------------------------------------

    def _handle_failures(
        self, job: r.JobRef, spec: RLJobSpec, pods: list[PodView], status: Status, event: EventSink
    ) -> bool:
        """Apply spec.failurePolicy's decision (kubeforge.failure_policy) to failed pods; True if there were
        any (the job failed, or its pods are restarting: the pass ends here)."""
        failed = [p for p in pods if p.failed and not p.terminating]
        if not failed:
            return False
        live = [p for p in pods if not p.terminating]
        counters = Counters(
            status.get("restarts", 0), status.get("restartsByRole", {}), status.get("restartsByInstance", {})
        )
        decision = plan_failure(
            spec.failure_policy,
            Observed([p.failure() for p in failed], [p.instance for p in live], counters),
        )
        if decision.fail_job:
            self._delete_pods(job, [p for p in live if p.phase not in ("Succeeded", "Failed")])
            self._finish(status, "Failed", decision.message, event)
            return True
        # Delete first, count second: a crash in between under-counts a restart rather than
        # handling the same failure twice.
        self._delete_pods(job, [p for p in live if p.instance in decision.victims])
        status.set("restarts", decision.counters.restarts)
        status.set("restartsByRole", dict(decision.counters.by_role))
        status.set("restartsByInstance", dict(decision.counters.by_instance))
        status.set("startingSince", None)  # a restart is a new start: the next pass starts its clock
        metrics.RESTARTS.labels(job=job.name, namespace=job.namespace, role=decision.cause.instance.role).inc()
        self._transition(status, "Restarting", decision.message, event, warning=True, force_event=True)
        return True

    # -- status --------------------------------------------------------------------------------

    def _count(self, spec: RLJobSpec, pods: list[PodView], status: Status) -> int:
        counts: dict[str, dict[str, int]] = {}
        for inst in contract.instances(spec):
            counts.setdefault(inst.role, {"ready": 0, "total": 0})["total"] += 1
        for p in pods:
            if p.ready and not p.terminating and p.instance.role in counts:
                counts[p.instance.role]["ready"] += 1
        status.set("roles", counts)
        return sum(c["ready"] for c in counts.values())

    def _transition(
        self,
        status: Status,
        phase: str,
        message: str,
        event: EventSink,
        warning: bool = False,
        force_event: bool = False,
    ) -> None:
        changed = status.get("phase") != phase
        status.set("phase", phase)
        status.set("message", message)
        if changed or force_event:
            event("Warning" if warning else "Normal", phase, message)

    def _report_stuck(self, status: Status, diagnosis: stuck.Diagnosis | None, event: EventSink) -> None:
        """status.stuck and the Stuck condition; an Event only when the stuck pod or its reason changes."""
        if diagnosis is None:
            status.set("stuck", None)
            if status.get("conditions") and any(c["type"] == "Stuck" for c in status.get("conditions")):
                status.condition("Stuck", False, "NoneStuck", "")
            return
        due = stuck.event_due(status.get("stuck"), diagnosis)
        status.set("stuck", diagnosis.as_status())
        status.condition("Stuck", True, diagnosis.reason, diagnosis.describe())
        if due:
            event("Warning", diagnosis.reason, diagnosis.describe())

    def _finish(self, status: Status, phase: str, message: str, event: EventSink) -> None:
        status.set("completionTime", now())
        status.condition("Complete" if phase == "Succeeded" else "Failed", True, phase, message)
        self._transition(status, phase, message, event, warning=phase == "Failed")

    def _expire(self, job: r.JobRef, body: dict[str, Any], status: Status) -> None:
        ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
        finished = status.get("completionTime")
        if ttl is None or not finished:
            return
        if (datetime.now(UTC) - _parse_time(finished)).total_seconds() >= ttl:
            log.info("deleting %s/%s: ttlSecondsAfterFinished (%s s) passed", job.namespace, job.name, ttl)
            self._ignore(
                404,
                lambda: self.custom.delete_namespaced_custom_object(
                    API_GROUP,
                    API_VERSION,
                    job.namespace,
                    PLURAL,
                    job.name,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )

    # -- API -----------------------------------------------------------------------------------

    def _pods(self, job: r.JobRef, event: EventSink) -> list[PodView]:
        # The raw JSON: building client models for every pod of every pass costs more than the rest of it.
        listed = _json(
            self.core.list_namespaced_pod(
                job.namespace,
                label_selector=f"{r.LABEL_JOB}={job.name}",
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        )
        views = []
        for pod in listed.get("items") or []:
            try:
                view = PodView.of(pod)
            except UnreadablePod as e:
                # Not the operator's doing (someone labelled a pod by hand): reported once, then ignored,
                # neither counted nor deleted. The job's own pods go on being reconciled.
                meta = pod.get("metadata") or {}
                key = meta.get("uid") or f"{job.namespace}/{meta.get('name')}"
                if key not in self._reported_pods:
                    self._reported_pods.add(key)
                    message = f"pod {meta.get('name')} is ignored: {e}"
                    log.warning("%s/%s: %s", job.namespace, job.name, message)
                    event("Warning", UNREADABLE_POD, message)
                continue
            if view is not None:
                views.append(view)
        return views

    def _delete_pods(self, job: r.JobRef, pods: list[PodView]) -> None:
        for p in pods:
            self._ignore(
                404,
                lambda p=p: self.core.delete_namespaced_pod(
                    p.name,
                    job.namespace,
                    grace_period_seconds=30,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )

    def _check_owned(self, job: r.JobRef, obj: dict[str, Any]) -> bool:
        """Whether `obj` (the desired spec ConfigMap) exists; raise CreateRefused if it does and this
        RLJob's uid is not its controller."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            existing = _json(
                self.core.read_namespaced_config_map(
                    name, job.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        if r.controller_uid(existing) != job.uid:
            raise CreateRefused(stuck.Diagnosis(f"{kind} {name}", FOREIGN, foreign_message(job, kind, existing)))
        return True

    def _create(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False if it existed already."""
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        create = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
            "Secret": self.core.create_namespaced_secret,
            "NetworkPolicy": self.net.create_namespaced_network_policy,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
        }[kind]
        try:
            response = create(ns, obj, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as e:
            if e.status == 409:  # it exists already (an earlier pass, or an operator that died mid-reconcile)
                return False
            _raise_if_refused(kind, obj["metadata"]["name"], e)
            raise
        _release(response)
        return True

    def _ensure_pod_group(self, job: r.JobRef, spec: RLJobSpec) -> str:
        """Create the gang scheduler's PodGroup; an explanation if its CRD is missing, else ''."""
        group = r.pod_group(job, spec)
        if group is None:
            return ""
        api_group, version, plural = r.POD_GROUP_API[spec.scheduling.gang]
        try:
            response = self.custom.create_namespaced_custom_object(
                api_group,
                version,
                job.namespace,
                plural,
                group,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            _release(response)
        except ApiException as e:
            if e.status == 404:
                return (
                    f"scheduling.gang is {spec.scheduling.gang} but the cluster has no {plural}.{api_group} "
                    f"resource; install that scheduler or choose another gang mechanism"
                )
            if e.status != 409:
                _raise_if_refused(group["kind"], group["metadata"]["name"], e)
                raise
        return ""

    def _ensure_shared_objects(self, job: r.JobRef, spec: RLJobSpec) -> bool:
        """Create the job's shared objects that are missing; whether the spec ConfigMap was created now."""
        # The spec is trusted by every pod of the job: a ConfigMap this RLJob does not own (left by someone
        # else, or by an earlier job of the same name) is never used. It is checked before anything is
        # created, so a refused job gets nothing at all. The token Secret needs no check: its name carries
        # the uid, so none made before the job can have it, and the operator may not read Secrets.
        spec_map = r.config_map(job, spec)
        existed = self._check_owned(job, spec_map)
        created = not existed and self._create(spec_map)
        if not existed and not created:
            self._check_owned(job, spec_map)  # someone created it since the read
        self._create(r.secret(job, self.signer.tokens(job.uid)))
        self._create(r.service(job))
        self._create(r.network_policy(job, self.scraper))
        if claim := r.checkpoint_claim(job, spec):
            self._create(claim)
        return created

    def _follow_spec_edits(
        self, job: r.JobRef, spec: RLJobSpec, generation: int | None, status: Status, written: bool
    ) -> None:
        """Rewrite the spec ConfigMap once per spec generation: running pods then see the edit (the kubelet
        swaps the volume's files in place), and the controller's generator pool and the trainer follow
        a scaled generator count (kubeforge.contract.PEERS_FILE). The CRD lets only what can follow an
        edit change (kubeforge.crd.MUTABLE). status.observedGeneration is the generation written."""
        if generation is None or status.get("observedGeneration") == generation:
            return
        if not written:
            try:
                _release(
                    self.core.patch_namespaced_config_map(
                        job.config_name,
                        job.namespace,
                        {"data": r.config_map(job, spec)["data"]},
                        _preload_content=False,
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                )
            except ApiException as e:
                if e.status != 404:
                    raise
                return  # not created yet: the pass that creates the pods writes it
        status.set("observedGeneration", generation)

    def _patch_status(self, job: r.JobRef, patch: dict[str, Any]) -> str | None:
        """Patch the status; the RLJob's new resourceVersion, None if it is gone."""
        try:
            response = self.custom.patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                job.namespace,
                PLURAL,
                job.name,
                {"status": patch},
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status != 404:
                raise
            return None
        return _json(response)["metadata"]["resourceVersion"]

    @staticmethod
    def _ignore(code: int, call: Callable[[], Any]) -> None:
        """Make a call whose answer is not needed (`_preload_content=False`: no model is built)."""
        try:
            response = call()
        except ApiException as e:
            if e.status != code:
                raise
        else:
            _release(response)


def foreign_message(job: r.JobRef, kind: str, existing: dict[str, Any]) -> str:
    """Why an existing `<job>-spec` is not used, and what to do about it."""
    meta = existing.get("metadata") or {}
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    if owner and owner.get("kind") == "RLJob" and owner.get("name") == job.name:
        return (
            f"exists and belongs to an earlier RLJob {job.name} (uid {owner.get('uid')}), not to this one "
            f"(uid {job.uid}); it is not used. The garbage collector deletes it with that job, and the pods "
            "are created once it is gone; if it stays, delete it"
        )
    held = f"{owner.get('kind')} {owner.get('name')} (uid {owner.get('uid')})" if owner else "no owner"
    return (
        f"exists and is not this RLJob's (its controller: {held}); it is not used and no pod is created. "
        f"Delete it (kubectl -n {job.namespace} delete {kind.lower()} {meta.get('name')}), "
        "or give the RLJob another name"
    )


def _release(response: Any) -> None:
    """Read the rest of a `_preload_content=False` response, so that its connection can be reused."""
    response.drain_conn()
    response.release_conn()


def _json(response: Any) -> dict[str, Any]:
    """The body of a `_preload_content=False` response, its connection back in the pool."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()
