"""A small async client of the reward role, for the controller: one call per batch, replicas in turn.

A replica that cannot take the batch (refuses the connection, is killed before it answers, or
answers 502/503/504) is retried with backoff on the next replica; an answer that says the batch
itself failed (a reward function raised: HTTP 500 with the function's error, or 4xx) is final,
never papered over.

A replica that is merely slow is never given up on: each request carries the client's budget
(`budget_seconds`), the replica answers within it (items not scored by then score 0, with a
reason; kubeforge.rewards.scoring), and the client waits ANSWER_MARGIN_S longer. Resending a
batch that is still being scored would only double the work; a replica that has not answered by
then is hung, and the batch fails with that message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from kubeforge import limits
from kubeforge.rewards import scoring

log = logging.getLogger("kubeforge.rewards")

# Statuses that say "this replica cannot take it now", not "this batch is wrong".
RETRIABLE_STATUS = frozenset({502, 503, 504})
# How much longer than its budget the client waits for a replica's answer: the request's upload
# and parsing (up to 64 MiB of JSON) and the answer's way back, with room to spare.
ANSWER_MARGIN_S = 60.0
# A replica that does not accept a connection within this is down; the next one is tried.
CONNECT_TIMEOUT_S = 10.0


class RewardError(RuntimeError):
    """The reward role refused or failed a batch; the message carries its answer."""


class RewardClient:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        budget: float = scoring.DEFAULT_BUDGET_S,
        timeout: float | None = None,
        token: str = "",
        retry_seconds: float = 600.0,
        backoff: tuple[float, float] = (0.5, 10.0),
    ):
        """`budget`: seconds a replica may spend on one batch; `timeout`: how long the client waits for
        its answer, budget + ANSWER_MARGIN_S unless given (it must be longer than the budget)."""
        if not urls:
            raise ValueError("no reward replicas: the job needs spec.roles.reward.replicas >= 1")
        if not 0 < budget <= limits.MAX_SCORE_BUDGET_S:
            raise ValueError(f"budget: got {budget:g} s; expected more than 0, at most {limits.MAX_SCORE_BUDGET_S:g}")
        timeout = budget + ANSWER_MARGIN_S if timeout is None else timeout
        if timeout <= budget:
            raise ValueError(
                f"timeout ({timeout:g} s) must be longer than the budget ({budget:g} s): a client that stops "
                "waiting first would give up on batches a replica is still scoring"
            )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._urls = itertools.cycle([u.rstrip("/") for u in urls])
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_S, timeout)), headers=headers
        )
        self.budget, self.timeout = budget, timeout
        self.retry_seconds = retry_seconds
        self.backoff = backoff
        self.retries = 0

    async def score(self, task: str, items: Sequence[dict[str, str]]) -> dict[str, Any]:
        """{"rewards": [float], "components": {name: [float]}, "reasons": [per item: None, or why it was not
        scored, and so scored 0]} for `items` (prompt, completion, answer)."""
        body = {"task": task, "items": list(items), "budget_seconds": self.budget}
        deadline = time.monotonic() + self.retry_seconds
        delay, max_delay = self.backoff
        while True:
            url = next(self._urls)
            try:
                reply = await self._http.post(f"{url}/score", json=body)
                if reply.status_code == 200:
                    return self._checked(url, reply.json())
                if reply.status_code not in RETRIABLE_STATUS:
                    raise RewardError(f"{url}/score: HTTP {reply.status_code} {reply.text[:500]}")
                problem = f"HTTP {reply.status_code}"
            except httpx.ReadTimeout:
                # The replica took the batch and is still on it: past its budget, so it is hung. Another
                # replica would score the same batch again while this one may still be computing.
                raise RewardError(
                    f"{url}/score: no answer within {self.timeout:g} s although a replica answers within its "
                    f"budget of {self.budget:g} s: the replica is hung; the batch was not resent"
                ) from None
            except httpx.TransportError as e:  # not connected, or the connection died: no one is scoring it
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() + delay > deadline:
                raise RewardError(f"no reward replica scored the batch within {self.retry_seconds:.0f} s: {problem}")
            self.retries += 1
            log.warning("reward replica %s: %s; retrying in %.1f s on the next replica", url, problem, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)

    @staticmethod
    def _checked(url: str, out: dict[str, Any]) -> dict[str, Any]:
        """The answer, with a warning when part of the batch ran out of budget (those items scored 0)."""
        unscored = [reason for reason in out.get("reasons") or [] if reason]
        if unscored:
            n, total = len(unscored), len(out["rewards"])
            log.warning("reward replica %s: %d of %d items not scored, so 0 (%s)", url, n, total, unscored[0])
        return out

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
