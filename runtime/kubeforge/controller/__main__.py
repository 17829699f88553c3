"""`python -m kubeforge.controller`: the process that runs the job's RL loop.

It imports the app named by spec.roles.controller.app, waits for its peers, and awaits the
app's `main(job)`. When the loop returns the job is done and the process exits 0.
"""

from __future__ import annotations

import importlib
from typing import Any

from kubeforge import serving
from kubeforge.controller.job import Job


async def run(server: serving.RoleServer) -> None:
    job = Job(server.ctx)
    app_name = job.spec.roles.controller.app
    app = importlib.import_module(app_name)
    if not hasattr(app, "main"):
        raise RuntimeError(f"spec.roles.controller.app: module {app_name!r} has no `async def main(job)`")

    @server.app.get("/status")
    async def status() -> dict[str, Any]:
        return {"steps": job.spec.steps, "progress": job.progress.model_dump(by_alias=True)}

    server.set_ready()
    try:
        await job.wait_for_peers()
        await app.main(job)
        await job.flush()
    finally:
        server.final_status["progress"] = job.progress.model_dump(by_alias=True, exclude_none=True)


if __name__ == "__main__":
    serving.main(run)
