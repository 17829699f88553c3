"""Scoring one batch: its items shared out to a few threads, within a time budget.

Threads, because an item can be slow while the others are not: the math reward compares an
expression in a sandbox child for up to its timeout (kubeforge.rewards.sandbox), a model judge
waits on HTTP. With as many threads as sandbox children, K slow answers take about one timeout.

A budget, because the batch's caller is waiting: once `deadline` passes, the items not scored yet
score 0 in every component, `reasons[i]` says why, and the call returns at once (an item still
running finishes in the background; its result is dropped). A reward function that can give up
in time asks batch_deadline(): the math reward's sandbox kills a comparison still running then.
The reward role gives every request its budget (DEFAULT_BUDGET_S unless the request asks for
another), and RewardClient waits longer than that budget, so a slow batch is answered with
zeros, never given up on and resent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeforge.rewards.functions import WeightedReward

# Seconds a reward replica spends on one /score request by default. A batch of normal answers
# takes far less; this bounds a batch of pathological ones (each math answer may take
# sandbox.SYMPY_TIMEOUT_S) well within the client's wait (RewardClient: budget + a margin).
DEFAULT_BUDGET_S = 240.0
OUT_OF_BUDGET = "not scored: the request's time budget ran out first"

# Set in each scoring thread (a thread starts with an empty context, and serves one batch).
_deadline: ContextVar[float | None] = ContextVar("kubeforge_reward_batch_deadline", default=None)


def batch_deadline() -> float | None:
    """The time.monotonic() deadline of the batch that the calling reward function scores an item of;
    None outside score(), or when the batch has none. Past it, the item's result is dropped."""
    return _deadline.get()


class _Batch:
    """The items, handed out one at a time; results are taken until the batch is closed."""

    def __init__(self, rewards: Sequence[WeightedReward], items: Sequence[dict[str, str]], deadline: float | None):
        self.rewards, self.items, self.deadline = rewards, items, deadline
        self.rows: list[dict[str, float] | None] = [None] * len(items)
        self.error: Exception | None = None
        self.finished = threading.Event()  # every item scored, or one raised
        self._next = self._scored = 0
        self._closed = False
        self._lock = threading.Lock()
        if not items:
            self.finished.set()

    def work(self) -> None:
        """One thread's loop: score the next unclaimed item until none is left or the batch is closed."""
        _deadline.set(self.deadline)
        while True:
            with self._lock:
                if self._closed or self._next == len(self.items):
                    return
                i = self._next
                self._next += 1
            item = self.items[i]
            try:
                row = {
                    r.name: float(r.fn(item["prompt"], item["completion"], item.get("answer", "")))
                    for r in self.rewards
                }
            except Exception as e:  # a raising reward function fails the whole batch, as it would alone
                with self._lock:
                    if not self._closed and self.error is None:
                        self.error = e
                    self.finished.set()
                return
            with self._lock:
                if self._closed:
                    return
                self.rows[i] = row
                self._scored += 1
                if self._scored == len(self.items):
                    self.finished.set()

    def close(self) -> list[dict[str, float] | None]:
        """Stop taking results; the rows scored so far (None: not scored)."""
        with self._lock:
            self._closed = True
            return list(self.rows)


def score(
    rewards: Sequence[WeightedReward],
    items: Sequence[dict[str, str]],
    *,
    threads: int = 1,
    deadline: float | None = None,
) -> dict[str, Any]:
    """{"rewards": weighted sums, "components": {name: raw scores}, "reasons": [per item: None, or why it
    was not scored]} for `items` (prompt, completion, answer), scored by `threads` threads until
    `deadline` (a time.monotonic() value; None: no limit). A raising reward function raises."""
    if threads < 1:
        raise ValueError(f"scoring needs at least 1 thread, got {threads}")
    batch = _Batch(rewards, items, deadline)
    if deadline is None or time.monotonic() < deadline:  # a request that waited past its deadline starts nothing
        for _ in range(min(threads, len(items))):
            # Daemon threads: one stuck in a reward function past the deadline must not hold up the exit.
            threading.Thread(target=batch.work, name="reward-scoring", daemon=True).start()
        batch.finished.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    rows = batch.close()
    if batch.error is not None:
        raise batch.error
    components = {r.name: [0.0 if row is None else row[r.name] for row in rows] for r in rewards}
    totals = [0.0 if row is None else sum(r.weight * row[r.name] for r in rewards) for row in rows]
    reasons = [OUT_OF_BUDGET if row is None else None for row in rows]
    return {"rewards": totals, "components": components, "reasons": reasons}
