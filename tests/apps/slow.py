"""A test app that takes a while: one step every 0.2 s, for tests that act on a running job."""

import asyncio

from kubeforge.controller import Job


async def main(job: Job) -> None:
    for step in range(1, job.spec.steps + 1):
        await asyncio.sleep(0.2)
        job.report(step, policy_version=step, reward_mean=step / job.spec.steps)
