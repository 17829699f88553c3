"""The capacity gate: its policy (kubeforge_operator.capacity, table-driven), the admissions that make it
race-free (inventory.Gate), and the watch-fed inventory it reads (inventory.Inventory, against a fake API)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from unittest.mock import MagicMock

import pytest
from kubeforge.validation import parse_spec
from kubeforge_operator import capacity, inventory
from kubeforge_operator.api import REQUEST_TIMEOUT
from kubeforge_operator.capacity import Need, Node
from kubeforge_operator.reconcile import Reconciler
from kubeforge_operator.resources import JobRef
from test_operator_reconcile_stuck import FakeCluster, _pass


def _nodes(*gpus: int, labels: dict[str, str] | None = None) -> list[Node]:
    return [Node(f"n{i}", g, labels or {}) for i, g in enumerate(gpus)]


def _pods(*gpus: int, prefix: str = "trainer") -> list[Need]:
    return [Need(f"{prefix}-{i}", g) for i, g in enumerate(gpus)]


# (case, nodes, GPUs used per node, reserved (admitted jobs' pods on no node), wanted, words of the refusal or "")
POLICY_CASES = [
    ("fits on empty nodes", _nodes(8, 8), {}, [], _pods(4, 4, 1, 1), ""),
    ("nothing wanted", _nodes(8), {"n0": 8}, [], [], ""),
    ("no node at all", [], {}, [], _pods(1), "needs 1 GPUs in 1 pods"),
    ("too many GPUs in all", _nodes(8, 8), {}, [], _pods(8, 8, 8), "needs 24 GPUs in 3 pods"),
    ("one pod larger than any node", _nodes(8, 8), {}, [], _pods(16), "trainer-0 alone needs 16 on one node"),
    ("enough in all, but split across nodes", _nodes(8, 8), {"n0": 5, "n1": 5}, [], _pods(4), "free now: 6"),
    ("pods on nodes hold their GPUs", _nodes(8, 8), {"n0": 8, "n1": 4}, [], _pods(4, 1), "needs 5 GPUs"),
    ("exactly full", _nodes(8, 8), {"n0": 4, "n1": 4}, [], _pods(4, 4), ""),
    # The race of two jobs created together: the first one's pods are not on a node yet, and still count.
    (
        "an admitted job's pending pods hold their GPUs",
        _nodes(8, 8),
        {},
        _pods(4, 4, 1, 1, prefix="first"),
        _pods(4, 4, 1, 1),
        "10 of them held for 4 pods of jobs admitted earlier",
    ),
    ("beside an admitted job that leaves room", _nodes(8, 8), {}, _pods(4, 4, prefix="first"), _pods(4, 4), ""),
    (
        "admitted jobs that do not fit now come first",
        _nodes(8),
        {"n0": 4},
        _pods(8, prefix="first"),
        _pods(1),
        "jobs admitted earlier wait for their GPUs first (first-0 of one needs 8)",
    ),
    # First-fit decreasing places the 6 first, then the 2s fill the gaps.
    ("largest first", _nodes(8, 4), {}, [], [Need("a", 2), Need("b", 6), Need("c", 2), Need("d", 2)], ""),
    ("a node selector the nodes match", _nodes(8, labels={"gpu": "h200"}), {}, [], [Need("t", 8, {"gpu": "h200"})], ""),
    ("a node selector no node matches", _nodes(8, 8), {}, [], [Need("t", 1, {"gpu": "h200"})], "t alone needs 1"),
    ("a node over-committed counts as full", _nodes(4, 8), {"n0": 6}, [], _pods(8, 1), "needs 9 GPUs"),
]


@pytest.mark.parametrize(
    ("case", "nodes", "used", "reserved", "wanted", "words"), POLICY_CASES, ids=[c[0] for c in POLICY_CASES]
)
def test_the_policy(
    case: str, nodes: list[Node], used: dict[str, int], reserved: list[Need], wanted: list[Need], words: str
) -> None:
    why = capacity.shortfall(nodes, used, reserved, wanted)
    if not words:
        assert why == ""
    else:
        assert words in why, why


def _spec(**fields: Any) -> Any:
    # Two trainer nodes share the run directory's claim: ReadWriteMany (the operator refuses ReadWriteOnce).
    storage = {"checkpoint": {"storage": {"accessMode": "ReadWriteMany", "storageClassName": "nfs"}}}
    return parse_spec({"model": {"path": "/m"}, **storage, **fields}, source="t")


def test_needs_lists_the_gpu_pods_with_their_node_selectors() -> None:
    spec = _spec(
        roles={"trainer": {"nodes": 2, "gpusPerNode": 4, "nodeSelector": {"pool": "train"}}, "generator": {"gpus": 1}},
        scheduling={"nodeSelector": {"zone": "a"}},
    )
    assert capacity.needs(spec) == (
        Need("trainer-0", 4, {"zone": "a", "pool": "train"}),
        Need("trainer-1", 4, {"zone": "a", "pool": "train"}),
        Need("generator-0", 1, {"zone": "a"}),
    )


SCHEDULED = {"type": "Scheduled", "status": "True", "reason": "Capacity", "message": ""}
WAITING = {"type": "Scheduled", "status": "False", "reason": "InsufficientGPUs", "message": "..."}
# (case, spec, status, admitted?)
ADMITTED_CASES = [
    ("running", {}, {"phase": "Running", "conditions": [SCHEDULED]}, True),
    ("restarting", {}, {"phase": "Restarting", "conditions": [SCHEDULED]}, True),
    ("waiting at the gate", {}, {"phase": "Pending", "conditions": [WAITING]}, False),
    ("new", {}, {}, False),
    ("succeeded", {}, {"phase": "Succeeded", "conditions": [SCHEDULED]}, False),
    ("failed", {}, {"phase": "Failed", "conditions": [SCHEDULED]}, False),
    ("suspended", {}, {"phase": "Suspended", "conditions": [SCHEDULED]}, False),
    ("another gang mechanism", {"scheduling": {"gang": "off"}}, {"phase": "Running", "conditions": [SCHEDULED]}, False),
]


@pytest.mark.parametrize(("case", "spec", "status", "admitted"), ADMITTED_CASES, ids=[c[0] for c in ADMITTED_CASES])
def test_admissions_are_read_back_from_status(
    case: str, spec: dict[str, Any], status: dict[str, Any], admitted: bool
) -> None:
    assert capacity.admitted_before(spec, status) is admitted


# -- the gate: one decision at a time ---------------------------------------------------------------

JOB_SPEC = {"roles": {"trainer": {"nodes": 2, "gpusPerNode": 4}, "generator": {"replicas": 2, "gpus": 1}}}  # 10 GPUs


def _view(bound: set[tuple[str, str, str]] | None = None, used: dict[str, int] | None = None) -> inventory.Snapshot:
    return inventory.Snapshot(tuple(_nodes(8, 8)), used or {}, frozenset(bound or set()))


def test_two_jobs_created_together_are_not_both_admitted_when_only_one_fits() -> None:
    # The snapshot is slow, as a list would be: without the lock both decisions would see the same free GPUs.
    def slow() -> inventory.Snapshot:
        time.sleep(0.05)
        return _view()

    gate = inventory.Gate(slow)
    spec = _spec(**JOB_SPEC)
    results: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def admit(name: str) -> None:
        barrier.wait()
        results[name] = gate.admit(JobRef(name, "team", f"uid-{name}"), spec)

    threads = [threading.Thread(target=admit, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(bool(why) for why in results.values()) == [False, True], results
    refused = next(why for why in results.values() if why)
    assert "needs 10 GPUs" in refused and "10 of them held" in refused
    assert len(gate.admitted()) == 1


def test_an_admitted_jobs_pods_on_nodes_count_once_and_its_admission_ends_with_it() -> None:
    view = _view()
    gate = inventory.Gate(lambda: view)
    spec = _spec(**JOB_SPEC)
    a, b = JobRef("a", "team", "ua"), JobRef("b", "team", "ub")
    assert gate.admit(a, spec) == ""
    assert "needs 10 GPUs" in gate.admit(b, spec)
    # a's pods are on nodes now: counted by the node, not held twice.
    bound = {("team", "a", p) for p in ("trainer-0", "trainer-1", "generator-0", "generator-1")}
    view = _view(bound, {"n0": 5, "n1": 5})
    assert "needs 10 GPUs" in gate.admit(b, spec)
    assert gate.admit(a, spec) == "", "an admitted job stays admitted"
    # a finished: its pods are gone, and so is its admission.
    gate.release(a)
    view = _view()
    assert gate.admit(b, spec) == ""
    assert gate.admitted() == [("team", "b")]


def test_a_job_re_created_under_the_same_name_is_a_new_job() -> None:
    gate = inventory.Gate(lambda: _view())
    spec = _spec(**JOB_SPEC)
    gate.hold(JobRef("a", "team", "old"), spec)
    gate.release(JobRef("a", "team", "new"))  # not the one held: nothing released
    assert gate.admitted() == [("team", "a")]
    assert gate.admit(JobRef("a", "team", "new"), spec) == ""  # the old one's admission is not held against it
    assert gate.admitted() == [("team", "a")]


def test_the_gate_waits_for_the_inventory() -> None:
    gate = inventory.Gate(lambda: None)
    assert gate.admit(JobRef("a", "team", "u"), _spec(**JOB_SPEC)) == inventory.NOT_LOADED
    assert gate.admitted() == []


# -- the inventory ------------------------------------------------------------------------------------


def _node(name: str, gpus: str | None, ready: bool = True, unschedulable: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"pool": "a"}, "resourceVersion": "1"},
        "spec": {"unschedulable": unschedulable},
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus} if gpus else {},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def _pod(
    name: str, gpus: int, node: str = "", job: str | None = None, version: str = "1", **extra: Any
) -> dict[str, Any]:
    labels = {"kubeforge.dev/job": job, "kubeforge.dev/role": "trainer", "kubeforge.dev/replica": "0"} if job else {}
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    return {
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": f"uid-{name}",
            "labels": labels,
            "resourceVersion": version,
        },
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": limits}}], **extra},
    }


NODE_CASES = [
    ("ready with GPUs", _node("n", "8"), Node("n", 8, {"pool": "a"})),
    ("ready without GPUs", _node("n", None), Node("n", 0, {"pool": "a"})),
    ("not ready", _node("n", "8", ready=False), None),
    ("cordoned", _node("n", "8", unschedulable=True), None),
]


@pytest.mark.parametrize(("case", "obj", "record"), NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_node_records(case: str, obj: dict[str, Any], record: Node | None) -> None:
    assert inventory.node_record(obj) == record


POD_CASES = [
    ("no GPU", _pod("p", 0), None),
    ("pending, someone else's", _pod("p", 2), inventory.Pod("", 2, None)),
    ("bound, a job's", _pod("p", 4, "n1", job="j"), inventory.Pod("n1", 4, ("team", "j", "trainer-0"))),
    (
        "an init container asking for more",
        _pod("p", 1, "n1", initContainers=[{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "3"}}}]),
        inventory.Pod("n1", 3, None),
    ),
]


@pytest.mark.parametrize(("case", "obj", "record"), POD_CASES, ids=[c[0] for c in POD_CASES])
def test_pod_records(case: str, obj: dict[str, Any], record: inventory.Pod | None) -> None:
    assert inventory.pod_record(obj) == record


class FakeWatchApi:
    """list_node / list_pod_for_all_namespaces: a list, then watches that hand out queued event lines."""

    def __init__(self, nodes: list[dict[str, Any]], pods: list[dict[str, Any]]):
        self.items = {"nodes": nodes, "pods": pods}
        self.events: dict[str, list[list[dict[str, Any]]]] = {"nodes": [], "pods": []}  # one list per watch
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.core = MagicMock()
        self.core.list_node.side_effect = lambda **kw: self._call("nodes", kw)
        self.core.list_pod_for_all_namespaces.side_effect = lambda **kw: self._call("pods", kw)

    def _call(self, kind: str, kwargs: dict[str, Any]) -> MagicMock:
        self.calls.append((kind, kwargs))
        if not kwargs.get("watch"):
            return MagicMock(data=json.dumps({"metadata": {"resourceVersion": "1"}, "items": self.items[kind]}))
        while not self.events[kind]:
            time.sleep(0.01)
        lines = [json.dumps(e).encode() + b"\n" for e in self.events[kind].pop(0)]
        return MagicMock(stream=lambda **_: iter(lines))


def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_inventory_lists_then_follows_the_watch_and_lists_again_when_it_is_gone() -> None:
    api = FakeWatchApi([_node("n0", "8"), _node("n1", "8")], [_pod("a", 4, "n0", job="j"), _pod("b", 1)])
    inv = inventory.Inventory(api.core, watch_seconds=60)
    assert inv.snapshot() is None
    inv.start()
    try:
        assert inv.wait_synced(5)
        view = inv.snapshot()
        assert view is not None
        assert [n.name for n in view.nodes] == ["n0", "n1"] and view.used == {"n0": 4}
        assert view.bound == {("team", "j", "trainer-0")}

        api.events["pods"].append([
            {"type": "MODIFIED", "object": _pod("b", 1, "n1", version="2")},  # bound by the scheduler
            {"type": "DELETED", "object": _pod("a", 4, "n0", job="j", version="3")},  # finished
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "4"}}},
        ])  # fmt: skip
        api.events["nodes"].append([{"type": "MODIFIED", "object": _node("n0", "8", ready=False)}])
        _until(lambda: (v := inv.snapshot()) is not None and v.used == {"n1": 1} and len(v.nodes) == 1)
        assert inv.snapshot().bound == frozenset()  # type: ignore[union-attr]

        # The next watch resumes from the bookmark; a 410 makes the inventory list again.
        api.items["pods"] = [_pod("c", 2, "n1")]
        api.events["pods"].append([{"type": "ERROR", "object": {"code": 410, "message": "too old"}}])
        _until(lambda: (v := inv.snapshot()) is not None and v.used == {"n1": 2})
    finally:
        inv.stop()
        api.events["nodes"].append([])
        api.events["pods"].append([])
    watches = [kw for kind, kw in api.calls if kind == "pods" and kw.get("watch")]
    assert [w["resource_version"] for w in watches[:2]] == ["1", "4"]
    # Every call has a deadline; a watch's outlasts the server's own end of it.
    assert all(kw["_request_timeout"] for _, kw in api.calls)
    assert all(kw["_request_timeout"] == REQUEST_TIMEOUT for _, kw in api.calls if not kw.get("watch"))
    assert all(kw["_request_timeout"][1] > kw["timeout_seconds"] for kw in watches)
    assert all(kw["field_selector"] == inventory.UNFINISHED for kind, kw in api.calls if kind == "pods")


# -- the reconciler applies it ------------------------------------------------------------------------


def test_the_reconciler_admits_one_of_two_jobs_and_the_other_once_the_first_lets_go(
    minimal_job: dict[str, Any],
) -> None:
    gate = inventory.Gate(lambda: _view())  # 16 GPUs free, nothing on a node yet
    spec = {
        **minimal_job["spec"],
        **JOB_SPEC,
        "checkpoint": {"storage": {"accessMode": "ReadWriteMany", "storageClassName": "nfs"}},
    }

    def body(name: str, status: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        meta = {"name": name, "namespace": "team", "uid": f"uid-{name}", "resourceVersion": "1"}
        return {"metadata": meta, "spec": {**spec, **extra}, "status": status or {}}

    a, b = FakeCluster(), FakeCluster()  # each lists only its own job's pods
    run_a, run_b = (Reconciler(c.core, c.net, c.custom, gate=gate) for c in (a, b))
    first, _ = _pass(a, body("a"), run_a)
    second, events = _pass(b, body("b"), run_b)
    assert first["phase"] == "Starting" and len(a.pods) == 6
    assert second["phase"] == "Pending" and b.pods == []
    scheduled = next(c for c in second["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "InsufficientGPUs")
    assert "10 of them held for 4 pods of jobs admitted earlier" in scheduled["message"]
    assert ("Normal", "Pending", second["message"]) in events
    assert gate.admitted() == [("team", "a")]

    # a is suspended: its pods go, and so does its admission; b is admitted on its next pass.
    _pass(a, body("a", first, suspend=True), run_a)
    assert gate.admitted() == []
    second, _ = _pass(b, body("b", second), run_b)
    assert second["phase"] == "Starting" and len(b.pods) == 6
    assert gate.admitted() == [("team", "b")]
