"""The reward role's HTTP API: POST /score, batched, within a time budget, with metrics.

Each request is scored by sandbox.configured_workers() threads (REWARD_WORKERS) and answered
within its budget (`budget_seconds`, else scoring.DEFAULT_BUDGET_S, counted once it is read):
items not scored by then score 0 with a reason in `reasons`, and a warning says how many
(kubeforge.rewards.scoring); kubeforge_reward_items_total counts only the items scored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import HTTPException
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from kubeforge import limits, serving
from kubeforge.rewards import functions, sandbox, scoring

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
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240),
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
    # The client sends its own (RewardClient), and waits longer than that for the answer.
    budget_seconds: float | None = Field(None, gt=0, le=limits.MAX_SCORE_BUDGET_S)


async def run(server: serving.RoleServer) -> None:
    rewards = functions.from_algorithm(server.ctx.spec.algorithm)
    threads = sandbox.configured_workers()  # a bad REWARD_WORKERS fails the role at start, with its message
    labels = serving.role_labels(server.ctx)
    ERRORS.labels(**labels)  # a zero, not a missing series, until the first error
    log.info(
        "reward functions: %s; %d items scored at once (%s)",
        ", ".join(f"{r.name} x {r.weight:g}" for r in rewards),
        threads,
        sandbox.WORKERS_ENV,
    )

    @server.app.post("/score")
    async def score(request: ScoreRequest) -> dict[str, Any]:
        budget = request.budget_seconds or scoring.DEFAULT_BUDGET_S
        # Counted from here: a request that then waits for a free thread spends its own budget, not more.
        deadline = time.monotonic() + budget
        if len(request.items) > limits.MAX_SCORE_ITEMS:
            raise HTTPException(
                400, f"{len(request.items)} items; at most {limits.MAX_SCORE_ITEMS} per request (MAX_SCORE_ITEMS)"
            )
        items = [item.model_dump() for item in request.items]
        REQUESTS.labels(**labels).inc()
        with LATENCY.labels(**labels).time():
            try:
                # Reward functions may be slow (verifiers, code runs): keep the event loop free.
                result = await asyncio.to_thread(scoring.score, rewards, items, threads=threads, deadline=deadline)
            except Exception as e:
                ERRORS.labels(**labels).inc()
                log.exception("scoring %d items of task %r failed", len(items), request.task)
                raise HTTPException(500, f"reward function failed: {type(e).__name__}: {e}") from None
        unscored = sum(reason is not None for reason in result["reasons"])
        if unscored:
            log.warning(
                "task %r: %d of %d items not scored within the request's budget of %g s; they score 0",
                request.task, unscored, len(items), budget,
            )  # fmt: skip
        SCORED.labels(**labels).inc(len(items) - unscored)
        return result

    await serving.serve_forever(server)
