"""A test app whose RL loop raises after its first step."""

from kubeforge.controller import Job


async def main(job: Job) -> None:
    job.report(1)
    raise RuntimeError("boom at step 1")
