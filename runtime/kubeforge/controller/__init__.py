"""Controller role: runs the job's RL loop (an app's `async def main(job)`) and reports progress."""

from kubeforge.controller.job import Job

__all__ = ["Job"]
