"""A small async client of the reward role, for the controller: one call per batch, replicas in turn.

A replica that does not answer (killed, restarting) or answers 5xx because it is overloaded is
retried with backoff on the next replica; an answer that says the batch itself failed (a reward
function raised: HTTP 500 with the function's error, or 4xx) is final, never papered over.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

log = logging.getLogger("kubeforge.rewards")

# Statuses that say "this replica cannot take it now", not "this batch is wrong".
RETRIABLE_STATUS = frozenset({502, 503, 504})


class RewardError(RuntimeError):
    """The reward role refused or failed a batch; the message carries its answer."""


class RewardClient:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 300.0,
        token: str = "",
        retry_seconds: float = 600.0,
        backoff: tuple[float, float] = (0.5, 10.0),
    ):
        if not urls:
            raise ValueError("no reward replicas: the job needs spec.roles.reward.replicas >= 1")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._urls = itertools.cycle([u.rstrip("/") for u in urls])
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers)
        self.retry_seconds = retry_seconds
        self.backoff = backoff
        self.retries = 0

    async def score(self, task: str, items: Sequence[dict[str, str]]) -> dict[str, Any]:
        """{"rewards": [float], "components": {name: [float]}} for `items` (prompt, completion, answer)."""
        body = {"task": task, "items": list(items)}
        deadline = time.monotonic() + self.retry_seconds
        delay, max_delay = self.backoff
        while True:
            url = next(self._urls)
            try:
                reply = await self._http.post(f"{url}/score", json=body)
                if reply.status_code == 200:
                    return reply.json()
                if reply.status_code not in RETRIABLE_STATUS:
                    raise RewardError(f"{url}/score: HTTP {reply.status_code} {reply.text[:500]}")
                problem = f"HTTP {reply.status_code}"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() + delay > deadline:
                raise RewardError(f"no reward replica scored the batch within {self.retry_seconds:.0f} s: {problem}")
            self.retries += 1
            log.warning("reward replica %s: %s; retrying in %.1f s on the next replica", url, problem, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
