"""The reward role's HTTP API: POST /score, batched, with metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import HTTPException
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from kubeforge import limits, serving
from kubeforge.rewards import functions

log = logging.getLogger("kubeforge.rewards")

REQUESTS = Counter(
    "kubeforge_reward_requests_total", "Score requests answered, failed ones included.", serving.ROLE_LABELS
)
SCORED = Counter("kubeforge_reward_items_total", "Items scored.", serving.ROLE_LABELS)
ERRORS = Counter(
    "kubeforge_reward_errors_total", "Score requests failed by a raising reward function.", serving.ROLE_LABELS
)
LATENCY = Histogram(
    "kubeforge_reward_request_seconds",
    "Wall time of one score request, reward functions included.",
    serving.ROLE_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    completion: str
    answer: str = ""


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = ""
    items: list[Item] = Field(..., min_length=1)


async def run(server: serving.RoleServer) -> None:
    rewards = functions.from_algorithm(server.ctx.spec.algorithm or {})
    labels = serving.role_labels(server.ctx)
    ERRORS.labels(**labels)  # a zero, not a missing series, until the first error
    log.info("reward functions: %s", ", ".join(f"{r.name} x {r.weight:g}" for r in rewards))

    @server.app.post("/score")
    async def score(request: ScoreRequest) -> dict[str, Any]:
        if len(request.items) > limits.MAX_SCORE_ITEMS:
            raise HTTPException(
                400, f"{len(request.items)} items; at most {limits.MAX_SCORE_ITEMS} per request (MAX_SCORE_ITEMS)"
            )
        items = [item.model_dump() for item in request.items]
        REQUESTS.labels(**labels).inc()
        with LATENCY.labels(**labels).time():
            try:
                # Reward functions may be slow (verifiers, code runs): keep the event loop free.
                result = await asyncio.to_thread(functions.score, rewards, items)
            except Exception as e:
                ERRORS.labels(**labels).inc()
                log.exception("scoring %d items of task %r failed", len(items), request.task)
                raise HTTPException(500, f"reward function failed: {type(e).__name__}: {e}") from None
        SCORED.labels(**labels).inc(len(items))
        return result

    await serving.serve_forever(server)
