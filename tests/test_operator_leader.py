"""Leader election (kubeforge_operator.leader): the Lease rules (table-driven), and electors against a fake
Lease API: one leads, a released lead is taken over at once, an expired one after its duration, a leader
that cannot renew stops, and operators with overlapping namespaces never both lead one."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from typing import Any
from unittest.mock import MagicMock

import pytest
from kubeforge_operator import leader
from kubeforge_operator.leader import Elector, Observer, Record, Timing, claim
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import MaxRetryError

NOW = "2026-12-03T12:00:00.000000Z"
HELD = Record("other", 15, "t0", "t1", 3)

# (case, current record, expired?, expected record or None)
CLAIM_CASES = [
    ("no Lease yet", None, False, Record("me", 15, NOW, NOW, 0)),
    ("my own: renewed", Record("me", 15, "t0", "t1", 2), False, Record("me", 15, "t0", NOW, 2)),
    ("my own, even if it looks expired", Record("me", 15, "t0", "t1", 2), True, Record("me", 15, "t0", NOW, 2)),
    ("another's, current", HELD, False, None),
    ("another's, unchanged for its duration", HELD, True, Record("me", 15, NOW, NOW, 4)),
    ("released", Record("", 1, "t0", "t1", 3), False, Record("me", 15, NOW, NOW, 4)),
]


@pytest.mark.parametrize(("case", "current", "expired", "expected"), CLAIM_CASES, ids=[c[0] for c in CLAIM_CASES])
def test_claim(case: str, current: Record | None, expired: bool, expected: Record | None) -> None:
    assert claim(current, "me", expired=expired, duration=15, now=NOW) == expected


def test_released_leaves_no_holder() -> None:
    assert leader.released(Record("me", 15, "t0", "t1", 2), NOW) == Record("", 1, "t0", NOW, 2)


def test_a_record_expires_only_after_it_stayed_unchanged_for_its_duration_on_this_clock() -> None:
    seen = Observer()
    assert not seen.expired("v1", 15, now=100.0)  # first sight: whatever its renewTime says
    assert not seen.expired("v1", 15, now=114.0)
    assert seen.expired("v1", 15, now=115.5)
    assert not seen.expired("v2", 15, now=116.0)  # renewed: the count starts again
    assert seen.expired("v2", 15, now=131.5)


@pytest.mark.parametrize(("duration", "deadline", "retry"), [(10, 10, 2), (15, 10, 10), (15, 10, 0)])
def test_timings_must_leave_a_margin(duration: float, deadline: float, retry: float) -> None:
    with pytest.raises(ValueError, match="retry period"):
        Timing(duration, deadline, retry)


class FakeLeases:
    """Leases in memory, with the API server's optimistic concurrency (a stale resourceVersion is a 409)."""

    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0
        self.lock = threading.Lock()
        self.down: set[str] = set()  # identities whose calls fail (their API server is unreachable)
        self.untimed: list[str] = []

    def api(self, identity: str) -> MagicMock:
        api = MagicMock()
        api.read_namespaced_lease.side_effect = lambda name, ns, **kw: self._read(identity, (ns, name), kw)
        api.create_namespaced_lease.side_effect = lambda ns, body, **kw: self._write(identity, body, kw, create=True)
        api.replace_namespaced_lease.side_effect = lambda name, ns, body, **kw: self._write(identity, body, kw)
        return api

    def _check(self, identity: str, kwargs: dict[str, Any]) -> None:
        if not kwargs.get("_request_timeout"):
            self.untimed.append(identity)
        if identity in self.down:
            raise MaxRetryError(None, "/leases", reason="connection refused")

    def _read(self, identity: str, key: tuple[str, str], kwargs: dict[str, Any]) -> MagicMock:
        self._check(identity, kwargs)
        with self.lock:
            if key not in self.leases:
                raise ApiException(status=404, reason="Not Found")
            return MagicMock(data=json.dumps(self.leases[key]).encode())

    def _write(self, identity: str, body: dict[str, Any], kwargs: dict[str, Any], create: bool = False) -> MagicMock:
        self._check(identity, kwargs)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self.lock:
            existing = self.leases.get(key)
            if (create and existing) or (
                not create and existing["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]
            ):
                raise ApiException(status=409, reason="Conflict")
            self.version += 1
            stored = copy.deepcopy(body)
            stored["metadata"]["resourceVersion"] = str(self.version)
            self.leases[key] = stored
            return MagicMock()

    def holder(self, namespace: str) -> str:
        with self.lock:
            lease = self.leases.get((namespace, leader.LEASE_NAME))
            return (lease or {}).get("spec", {}).get("holderIdentity") or ""


FAST = Timing(lease_duration=0.6, renew_deadline=0.4, retry_period=0.05)


def _elector(fake: FakeLeases, identity: str, namespaces: list[str]) -> Elector:
    return Elector(fake.api(identity), [(ns, leader.LEASE_NAME) for ns in namespaces], identity, FAST)


async def _until(check: Any, timeout: float = 5.0) -> float:
    """Wait until check() is true; the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not check():
        assert loop.time() - started < timeout, "timed out"
        await asyncio.sleep(0.01)
    return loop.time() - started


def test_one_of_two_leads_and_the_other_takes_over_when_it_stops_or_dies() -> None:
    async def scenario() -> None:
        fake = FakeLeases()
        lost: list[str] = []
        a, b = _elector(fake, "a", ["team"]), _elector(fake, "b", ["team"])
        run_a = asyncio.create_task(a.run(on_lost=lambda: lost.append("a")))
        await _until(a.elected.is_set)
        run_b = asyncio.create_task(b.run(on_lost=lambda: lost.append("b")))
        await asyncio.sleep(FAST.lease_duration * 2)  # b waits however long: a renews
        assert not b.elected.is_set() and fake.holder("team") == "a"

        # a stops and lets go: b takes over at its next try, not after the lease's duration.
        run_a.cancel()
        await a.release()
        took = await _until(b.elected.is_set)
        assert took < FAST.lease_duration and fake.holder("team") == "b"

        # b's API server goes away: b gives up the lead after the renew deadline, before a may take over.
        a = _elector(fake, "a", ["team"])
        run_a = asyncio.create_task(a.run(on_lost=lambda: lost.append("a")))
        fake.down.add("b")
        await _until(lambda: lost == ["b"])
        assert not b.elected.is_set() and not a.elected.is_set()
        took = await _until(a.elected.is_set)
        assert fake.holder("team") == "a"
        for task in (run_a, run_b):
            task.cancel()
        assert not fake.untimed

    asyncio.run(scenario())


def test_operators_with_overlapping_namespaces_never_both_lead_one() -> None:
    async def scenario() -> None:
        fake = FakeLeases()
        scopes = {"ab": ["a", "b"], "bc": ["c", "b"], "ca": ["c", "a"]}
        electors = {name: _elector(fake, name, namespaces) for name, namespaces in scopes.items()}
        tasks = [asyncio.create_task(e.run(on_lost=lambda: None)) for e in electors.values()]
        # The leases are taken in one order: no cycle of operators each holding what the next waits for.
        await _until(lambda: any(e.elected.is_set() for e in electors.values()))
        await asyncio.sleep(FAST.lease_duration * 2)
        leaders = [name for name, e in electors.items() if e.elected.is_set()]
        assert len(leaders) == 1, leaders
        for namespace in scopes[leaders[0]]:
            assert fake.holder(namespace) == leaders[0]
        for task in tasks:
            task.cancel()

    asyncio.run(scenario())
