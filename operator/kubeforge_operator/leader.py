"""Leader election: of all the operators that watch a namespace, one reconciles; the others wait.

Two replicas of the operator, or two releases that watch the same namespace, would each create the
job's pods and write its status, each acting on what the other just did. Each operator therefore
holds a coordination.k8s.io Lease named `kubeforge-operator` in every namespace it watches (in its own
namespace when it watches all of them), and reconciles only while it holds all of them: it runs
kopf, the reconcile daemons and the capacity gate only then. The leases are taken in a fixed
(sorted) order and an operator keeps those it holds while it waits for the next, so two operators
with overlapping namespace lists never each hold a part and wait for the other: one leads, the other
waits with what it holds and reconciles nothing. An operator watching every namespace and one
watching a few do not exclude each other: give a namespace to one release only.

Why a Lease of ours, not kopf's peering: kopf's peering needs its own CRDs (KopfPeering,
ClusterKopfPeering) installed and granted in every cluster, and it freezes the operators of lower
priority, with no election among equal ones (replicas of one Deployment all have the same priority:
each would have to be given its own). A Lease is the standard Kubernetes leader election
(kube-controller-manager, the scheduler, controller-runtime operators use it), needs only `leases`
in the RBAC, and shows who leads with `kubectl get lease`. kopf runs standalone inside the leader.

The rules are client-go's: a holder renews its Lease every `retry_period`; a candidate may take a
Lease whose holder is empty (released) or whose record it has seen unchanged for its
`leaseDurationSeconds`, measured on its own clock (so no two clocks are compared). A leader that
could not renew within `renew_deadline` (shorter than the duration) stops at once, before anyone
else may take over: the process exits (kubeforge_operator.__main__) and is restarted as a candidate,
so no reconcile pass of a former leader runs on. A leader that is stopped releases its Leases after
its last pass has finished, and a candidate takes over within `retry_period`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeforge_operator.api import TRANSPORT_ERRORS

log = logging.getLogger("kubeforge_operator.leader")

LEASE_NAME = "kubeforge-operator"


@dataclass(frozen=True)
class Timing:
    """Seconds, as client-go's leader election counts them (its defaults)."""

    lease_duration: float = 15.0  # how long a candidate waits on a record that does not change
    renew_deadline: float = 10.0  # how long a leader goes on without a successful renewal
    retry_period: float = 2.0  # how often a leader renews, and a candidate tries

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                f"leader election needs 0 < retry period ({self.retry_period}) < renew deadline "
                f"({self.renew_deadline}) < lease duration ({self.lease_duration})"
            )


@dataclass(frozen=True)
class Record:
    """A Lease's spec: who holds it, for how long a record stays good, and since when."""

    holder: str  # "" when released
    duration: int
    acquired: str | None = None
    renewed: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Record:
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration=int(spec.get("leaseDurationSeconds") or 0),
            acquired=spec.get("acquireTime"),
            renewed=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def as_spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration,
            "acquireTime": self.acquired,
            "renewTime": self.renewed,
            "leaseTransitions": self.transitions,
        }


def claim(current: Record | None, me: str, *, expired: bool, duration: int, now: str) -> Record | None:
    """The record that makes `me` the holder (a take-over or a renewal); None while another holds it.

    `expired`: the candidate has seen the current record unchanged for its duration."""
    if current is None:
        return Record(me, duration, now, now, 0)
    if current.holder == me:
        return replace(current, duration=duration, renewed=now)
    if current.holder and not expired:
        return None
    return Record(me, duration, now, now, current.transitions + 1)


def released(current: Record, now: str) -> Record:
    """The record a stopping leader leaves: no holder, so that a candidate takes over at its next try."""
    return replace(current, holder="", duration=1, renewed=now)


class Observer:
    """When this process first saw the current version of a Lease, on its own monotonic clock."""

    def __init__(self) -> None:
        self._seen: tuple[str, float] | None = None

    def expired(self, version: str, duration: float, now: float) -> bool:
        """Whether the record `version` has stayed unchanged for `duration` seconds since first seen."""
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, now)
        return now - self._seen[1] > duration


def _micro_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """Campaign for, then keep, every Lease of `leases` ((namespace, name) pairs)."""

    def __init__(
        self,
        api: client.CoordinationV1Api,
        leases: Sequence[tuple[str, str]],
        identity: str,
        timing: Timing = Timing(),
        clock: Callable[[], float] = time.monotonic,
    ):
        if not leases:
            raise ValueError("leader election needs at least one Lease")
        self.api = api
        self.leases = sorted(set(leases))  # one order for every operator: no two wait for each other
        self.identity = identity
        self.timing = timing
        self._clock = clock
        self._observers = {lease: Observer() for lease in self.leases}
        self._renewed: dict[tuple[str, str], float] = {}  # lease -> when the last write that held it started
        self._holders: dict[tuple[str, str], str] = {}  # the holder last seen, for one log line per change
        # A call waits about a retry period to connect and to answer (a renewal is due again by then), but
        # at least a second: a busy API server answers slower than a short test period.
        wait = max(1.0, timing.retry_period)
        self._timeout = (wait, wait)
        # A thread of its own: renewals never queue behind other work (progress reports, start-up lists).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leader")
        self.elected = asyncio.Event()

    def leading(self) -> bool:
        """Whether every Lease was renewed within the renew deadline."""
        now = self._clock()
        return all(now - self._renewed.get(lease, -float("inf")) < self.timing.renew_deadline for lease in self.leases)

    async def run(self, on_lost: Callable[[], None]) -> None:
        """Try the Leases in order every retry period, for good (until cancelled). `elected` is set once all
        are held; `on_lost` is called when a leader's renewals have failed for the renew deadline."""
        while True:
            started = self._clock()
            for lease in self.leases:
                if not await asyncio.get_running_loop().run_in_executor(self._thread, self._try, lease):
                    break  # in order: never hold a later Lease without the earlier ones
            if self.leading():
                if not self.elected.is_set():
                    log.info("%s leads: it holds %s", self.identity, ", ".join(f"{ns}/{n}" for ns, n in self.leases))
                    self.elected.set()
            elif self.elected.is_set():
                self.elected.clear()
                log.error("%s lost the lead: no renewal for %.0f s", self.identity, self.timing.renew_deadline)
                on_lost()
            await asyncio.sleep(max(0.0, self.timing.retry_period - (self._clock() - started)))

    async def release(self) -> None:
        """Give up every Lease held, so that a candidate takes over at once. Call once no pass runs."""
        self.elected.clear()
        for lease in self.leases:
            if lease in self._renewed:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._release, lease)
        self._renewed.clear()

    # -- one Lease -----------------------------------------------------------------------------

    def _read(self, lease: tuple[str, str]) -> dict[str, Any] | None:
        namespace, name = lease
        try:
            response = self.api.read_namespaced_lease(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    def _write(self, lease: tuple[str, str], current: dict[str, Any] | None, record: Record) -> None:
        namespace, name = lease
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": record.as_spec(),
        }
        if current is None:
            call = self.api.create_namespaced_lease(
                namespace, body, _preload_content=False, _request_timeout=self._timeout
            )
        else:
            # The version read: a write by anyone since then is refused (409) rather than overwritten.
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            call = self.api.replace_namespaced_lease(
                name, namespace, body, _preload_content=False, _request_timeout=self._timeout
            )
        call.release_conn()

    def _try(self, lease: tuple[str, str]) -> bool:
        """Take or renew one Lease; whether this process holds it now."""
        started = self._clock()
        try:
            current = self._read(lease)
            record = Record.of(current.get("spec") or {}) if current else None
            expired = record is not None and self._observers[lease].expired(
                current["metadata"]["resourceVersion"] if current else "", record.duration, started
            )
            wanted = claim(
                record,
                self.identity,
                expired=expired,
                duration=round(self.timing.lease_duration),
                now=_micro_time(datetime.now(UTC)),
            )
            if wanted is None:
                self._note_holder(lease, record.holder if record else "")
                return False
            self._write(lease, current, wanted)
        except ApiException as e:
            if e.status != 409:  # 409: another candidate wrote first; it holds the Lease
                log.warning("lease %s/%s: %s %s", *lease, e.status, e.reason)
            return False
        except TRANSPORT_ERRORS as e:
            log.warning("lease %s/%s: the API server did not answer (%s: %s)", *lease, type(e).__name__, e)
            return False
        self._renewed[lease] = started
        self._note_holder(lease, self.identity)
        return True

    def _release(self, lease: tuple[str, str]) -> None:
        try:
            current = self._read(lease)
            if current is None:
                return
            record = Record.of(current.get("spec") or {})
            if record.holder == self.identity:
                self._write(lease, current, released(record, _micro_time(datetime.now(UTC))))
                log.info("%s released lease %s/%s", self.identity, *lease)
        except (ApiException, *TRANSPORT_ERRORS) as e:
            # It expires by itself after its duration.
            log.warning("could not release lease %s/%s: %s", *lease, e)

    def _note_holder(self, lease: tuple[str, str], holder: str) -> None:
        if self._holders.get(lease) != holder:
            self._holders[lease] = holder
            if holder != self.identity:
                log.info("lease %s/%s is held by %s; %s waits", *lease, holder or "nobody", self.identity)
