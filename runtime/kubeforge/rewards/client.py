"""A small async client of the reward role, for the controller: one call per batch, replicas in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import httpx


class RewardError(RuntimeError):
    """The reward role refused or failed a batch; the message carries its answer."""


class RewardClient:
    def __init__(self, urls: Sequence[str], *, timeout: float = 300.0, token: str = ""):
        if not urls:
            raise ValueError("no reward replicas: the job needs spec.roles.reward.replicas >= 1")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._urls = itertools.cycle([u.rstrip("/") for u in urls])
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers)

    async def score(self, task: str, items: Sequence[dict[str, str]]) -> dict[str, Any]:
        """{"rewards": [float], "components": {name: [float]}} for `items` (prompt, completion, answer)."""
        url = next(self._urls)
        reply = await self._http.post(f"{url}/score", json={"task": task, "items": list(items)})
        if reply.status_code != 200:
            raise RewardError(f"{url}/score: HTTP {reply.status_code} {reply.text[:500]}")
        return reply.json()

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
