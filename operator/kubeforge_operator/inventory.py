"""The capacity gate's view of the cluster, and its admissions (kubeforge_operator.capacity is the policy).

`Inventory` is a watch-fed cache: one list, then a watch, of the nodes and of the unfinished pods of
the whole cluster (pods of any namespace hold GPUs on the nodes a job needs), kept in memory as only
what the gate reads: each ready, schedulable node's allocatable GPUs and labels, and each pod that
asks for GPUs (its node, its GPUs, and which job instance it is). A pending job's pass reads it
without a request to the API server; listing every pod of the cluster for every pending job on
every resync does not scale. A watch that ends is resumed from its last resourceVersion; one that
the API server no longer can resume (410 Gone), or that fails, is listed again.

`Gate` holds the admissions: which capacity-gated jobs the gate let through, with their GPU pods.
Its decisions are made one at a time under a lock, each counting the pods of every job admitted
before it that are on no node yet: two jobs created together cannot both be admitted on the same
free GPUs. A job stays admitted until it finishes, is suspended or is gone (the reconciler and the
reconcile daemon release it); an operator that starts reads the admissions back from the RLJobs'
status (`capacity.admitted_before`) before any pass runs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubeforge.contract import Instance
from kubeforge.spec import RLJobSpec
from kubernetes import client
from kubernetes.utils.quantity import parse_quantity
from kubernetes.watch.watch import iter_resp_lines

from kubeforge_operator import capacity
from kubeforge_operator.api import REQUEST_TIMEOUT
from kubeforge_operator.resources import GPU_RESOURCE, LABEL_JOB, LABEL_REPLICA, LABEL_ROLE, JobRef

log = logging.getLogger("kubeforge_operator.inventory")

# Pods that hold nothing any more are left out by the API server itself (a pod that finishes leaves the
# watch as DELETED).
UNFINISHED = "status.phase!=Succeeded,status.phase!=Failed"
# The API server ends each watch after this long; it is resumed from where it stopped.
WATCH_SECONDS = 300
# Why a pending job waits while the first lists have not arrived (the operator has just started).
NOT_LOADED = "the operator has not read the cluster's nodes and pods yet"


@dataclass(frozen=True)
class Pod:
    """A pod that asks for GPUs: where it is ('' while the scheduler has not bound it) and whose it is."""

    node: str
    gpus: int
    owner: tuple[str, str, str] | None  # (namespace, job, instance) of a kubeforge job's pod


@dataclass(frozen=True)
class Snapshot:
    """What the gate decides on: the nodes, the GPUs held on each, and the job instances on a node."""

    nodes: tuple[capacity.Node, ...]
    used: dict[str, int]
    bound: frozenset[tuple[str, str, str]]


def _gpus(quantity: Any) -> int:
    return int(parse_quantity(quantity)) if quantity not in (None, "") else 0


def node_record(obj: dict[str, Any]) -> capacity.Node | None:
    """A node from its JSON; None unless it is Ready and schedulable (it takes no new pod)."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ready or spec.get("unschedulable"):
        return None
    return capacity.Node(
        meta["name"], _gpus((status.get("allocatable") or {}).get(GPU_RESOURCE)), meta.get("labels") or {}
    )


def pod_gpus(spec: dict[str, Any]) -> int:
    """The GPUs a pod holds: its containers' together, or its largest init container's if that is more."""

    def limit(c: dict[str, Any]) -> int:
        resources = c.get("resources") or {}
        return _gpus(
            (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(GPU_RESOURCE)
        )

    return max(
        sum(limit(c) for c in spec.get("containers") or []), *(limit(c) for c in spec.get("initContainers") or []), 0
    )


def pod_record(obj: dict[str, Any]) -> Pod | None:
    """A pod from its JSON; None when it asks for no GPU (the gate has nothing to count)."""
    spec = obj.get("spec") or {}
    gpus = pod_gpus(spec)
    if not gpus:
        return None
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    owner = None
    replica = labels.get(LABEL_REPLICA, "")
    if LABEL_JOB in labels and LABEL_ROLE in labels and replica.isascii() and replica.isdigit():
        owner = (meta.get("namespace", ""), labels[LABEL_JOB], Instance(labels[LABEL_ROLE], int(replica)).name)
    return Pod(spec.get("nodeName") or "", gpus, owner)


def snapshot_of(nodes: dict[str, capacity.Node], pods: dict[str, Pod]) -> Snapshot:
    used: dict[str, int] = {}
    bound = set()
    for pod in pods.values():
        if pod.node:
            used[pod.node] = used.get(pod.node, 0) + pod.gpus
            if pod.owner:
                bound.add(pod.owner)
    return Snapshot(tuple(nodes.values()), used, frozenset(bound))


def _json(response: Any) -> dict[str, Any]:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _node_entry(obj: dict[str, Any]) -> tuple[str, capacity.Node | None]:
    return obj["metadata"]["name"], node_record(obj)


def _pod_entry(obj: dict[str, Any]) -> tuple[str, Pod | None]:
    return obj["metadata"]["uid"], pod_record(obj)


def listed(core: client.CoreV1Api) -> Snapshot:
    """The same view from two lists, now: for tools and tests; the operator keeps an `Inventory`."""
    nodes = _json(core.list_node(_preload_content=False, _request_timeout=REQUEST_TIMEOUT))
    pods = _json(
        core.list_pod_for_all_namespaces(
            field_selector=UNFINISHED, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        )
    )
    return snapshot_of(
        {k: v for k, v in map(_node_entry, nodes.get("items") or []) if v is not None},
        {k: v for k, v in map(_pod_entry, pods.get("items") or []) if v is not None},
    )


class _Gone(Exception):
    """The watch cannot resume from its resourceVersion (410): list again."""


class Inventory:
    """The watch-fed cache of nodes and GPU pods (see the module's docstring). Two daemon threads."""

    def __init__(self, core: client.CoreV1Api, watch_seconds: int = WATCH_SECONDS):
        self.core = core
        self.watch_seconds = watch_seconds
        self._lock = threading.Lock()
        self._nodes: dict[str, capacity.Node] = {}
        self._pods: dict[str, Pod] = {}
        self._synced = {"nodes": threading.Event(), "pods": threading.Event()}
        self._stop = threading.Event()
        self._open: dict[str, Any] = {}  # the watch response of each kind, closed by stop()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        follow = (
            ("nodes", self.core.list_node, _node_entry, self._nodes, {}),
            ("pods", self.core.list_pod_for_all_namespaces, _pod_entry, self._pods, {"field_selector": UNFINISHED}),
        )
        for kind, call, entry, store, selector in follow:
            thread = threading.Thread(
                target=self._follow, args=(kind, call, entry, store, selector), name=f"inventory-{kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for response in list(self._open.values()):
            try:
                response.shutdown()  # unblocks the thread's read
            except Exception:  # noqa: BLE001  (already closed: nothing to unblock)
                pass

    def wait_synced(self, timeout: float) -> bool:
        """Whether both first lists arrived within `timeout` seconds."""
        return all(event.wait(timeout) for event in self._synced.values())

    def snapshot(self) -> Snapshot | None:
        """The cluster as last seen; None until both first lists have arrived."""
        if not all(event.is_set() for event in self._synced.values()):
            return None
        with self._lock:
            return snapshot_of(self._nodes, self._pods)

    def _follow(
        self,
        kind: str,
        call: Callable[..., Any],
        entry: Callable[[dict[str, Any]], tuple[str, Any]],
        store: dict[str, Any],
        selector: dict[str, str],
    ) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                listed = _json(call(**selector, _preload_content=False, _request_timeout=REQUEST_TIMEOUT))
                fresh = {k: v for k, v in map(entry, listed.get("items") or []) if v is not None}
                with self._lock:
                    store.clear()
                    store.update(fresh)
                self._synced[kind].set()
                version = listed["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    version = self._watch(kind, call, entry, store, selector, version)
                    backoff = 0.5
            except _Gone:
                continue
            except Exception as e:  # noqa: BLE001  (any failure: list again, after a pause)
                if self._stop.is_set():
                    return
                log.warning("watching %s failed, listing again in %.1f s: %s: %s", kind, backoff, type(e).__name__, e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _watch(
        self,
        kind: str,
        call: Callable[..., Any],
        entry: Callable[[dict[str, Any]], tuple[str, Any]],
        store: dict[str, Any],
        selector: dict[str, str],
        version: str,
    ) -> str:
        """Follow one watch until the API server ends it; the resourceVersion to resume from."""
        response = call(
            **selector,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            _preload_content=False,
            # Events may be minutes apart; the server ends the watch first.
            _request_timeout=(REQUEST_TIMEOUT[0], self.watch_seconds + 30),
        )
        self._open[kind] = response
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = obj["metadata"]["resourceVersion"]
                if type_ == "BOOKMARK":
                    continue
                key, record = entry(obj)
                with self._lock:
                    if type_ == "DELETED" or record is None:
                        store.pop(key, None)
                    else:
                        store[key] = record
        finally:
            self._open.pop(kind, None)
            response.release_conn()
        return version


@dataclass
class _Admission:
    uid: str
    needs: tuple[capacity.Need, ...]


class Gate:
    """The admissions of capacity-gated jobs; `admit` decides one job at a time."""

    def __init__(self, snapshot: Callable[[], Snapshot | None]):
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._admitted: dict[tuple[str, str], _Admission] = {}

    def admit(self, job: JobRef, spec: RLJobSpec) -> str:
        """Admit the job if all of its GPU pods fit beside those of the jobs admitted before it; else why not.
        A job already admitted stays admitted (its pods' GPUs have been held for it all along)."""
        key = (job.namespace, job.name)
        needs = capacity.needs(spec)
        with self._lock:
            held = self._admitted.get(key)
            if held is not None and held.uid == job.uid:
                held.needs = needs
                return ""
            view = self._snapshot()
            if view is None:
                return NOT_LOADED
            reserved = [
                need
                for other, admission in self._admitted.items()
                if other != key
                for need in admission.needs
                if (*other, need.pod) not in view.bound
            ]
            why = capacity.shortfall(view.nodes, view.used, reserved, needs)
            if not why:
                self._admitted[key] = _Admission(job.uid, needs)
            return why

    def hold(self, job: JobRef, spec: RLJobSpec) -> None:
        """The job runs (its pods exist): keep it admitted, with the pods its spec has now."""
        with self._lock:
            self._admitted[(job.namespace, job.name)] = _Admission(job.uid, capacity.needs(spec))

    def release(self, job: JobRef) -> None:
        """The job finished, was suspended or is gone: its pods' GPUs are no longer held for it."""
        with self._lock:
            held = self._admitted.get((job.namespace, job.name))
            if held is not None and held.uid == job.uid:
                del self._admitted[(job.namespace, job.name)]

    def admitted(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._admitted)
