"""Preflight: check that a job's roles start, become ready and reach each other.

Run it before a long job on a new cluster or machine: it uses the same launcher, the same
environment contract and the same role processes as a training job, and fails with the name of
the role the controller cannot reach. Each step asks every replica of every role for /readyz
and /metrics over the addresses the environment contract gave the controller.

    kubeforge run apps/preflight/preflight.yaml
"""

from __future__ import annotations

import logging
import time

import httpx
from kubeforge.controller import Job

log = logging.getLogger("apps.preflight")


async def check_peers(job: Job, client: httpx.AsyncClient) -> dict[str, float]:
    """Round-trip seconds of /readyz and /metrics for every peer; raises naming the first that fails."""
    seconds = {}
    for role in ("trainer", "generator", "reward", "reference"):
        for replica, url in enumerate(job.urls(role)):
            started = time.perf_counter()
            for path in ("/readyz", "/metrics"):
                reply = await client.get(url + path)
                if reply.status_code != 200:
                    raise RuntimeError(
                        f"{role}-{replica} at {url}{path} answered HTTP {reply.status_code}: {reply.text[:200]}"
                    )
            seconds[f"{role}-{replica}"] = time.perf_counter() - started
    return seconds


async def main(job: Job) -> None:
    async with httpx.AsyncClient(timeout=10.0) as client:
        for step in range(1, job.spec.steps + 1):
            seconds = await check_peers(job, client)
            slowest = max(seconds, key=seconds.get)
            log.info(
                "step %d: %d roles answered; slowest %s in %.1f ms",
                step,
                len(seconds),
                slowest,
                1000 * seconds[slowest],
            )
            job.report(step)
