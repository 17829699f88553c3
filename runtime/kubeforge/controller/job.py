"""The handle an app's RL loop receives: the spec, the peers, the run directory, progress reporting."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prometheus_client import Gauge

from kubeforge.contract import RoleContext
from kubeforge.serving import ROLE_LABELS, role_labels
from kubeforge.spec import Progress, RLJobSpec

log = logging.getLogger("kubeforge.controller")

STEP = Gauge("kubeforge_controller_step", "Last finished training step.", ROLE_LABELS)
POLICY_VERSION = Gauge("kubeforge_controller_policy_version", "Policy version of the trainer's weights.", ROLE_LABELS)


class Job:
    """What the RL loop needs from its surroundings, and nothing about how they were started."""

    def __init__(self, ctx: RoleContext):
        self.ctx = ctx
        self.progress = Progress()
        self.started = time.monotonic()
        self._labels = role_labels(ctx)
        self._unsent = False
        self._pusher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.ctx.job

    @property
    def spec(self) -> RLJobSpec:
        return self.ctx.spec

    @property
    def run_dir(self) -> Path:
        return self.ctx.run_dir

    def urls(self, role: str) -> list[str]:
        """Base URLs of every replica of `role` (empty if the job has none)."""
        return list(self.ctx.peers.get(role, []))

    def report(
        self,
        step: int,
        *,
        policy_version: int | None = None,
        reward_mean: float | None = None,
        weight_sync_seconds: float | None = None,
    ) -> None:
        """Publish progress: the launcher and the operator show it as the job's status."""
        updates = {"step": step, "updated_at": datetime.now(UTC).isoformat()}
        for key, value in (
            ("policy_version", policy_version),
            ("reward_mean", reward_mean),
            ("weight_sync_seconds", weight_sync_seconds),
        ):
            if value is not None:
                updates[key] = value
        self.progress = self.progress.model_copy(update=updates)
        STEP.labels(**self._labels).set(step)
        POLICY_VERSION.labels(**self._labels).set(self.progress.policy_version)
        if self.ctx.progress_url:
            self._unsent = True
            if self._pusher is None or self._pusher.done():
                self._pusher = asyncio.get_running_loop().create_task(self._push())

    async def _push(self) -> None:
        """Send the newest progress to the operator, at most once a second; a lost report is
        superseded by the next one, so failures are logged, not retried."""
        headers = {"Authorization": f"Bearer {self.ctx.token}"}
        async with httpx.AsyncClient(timeout=5.0) as client:
            while self._unsent:
                self._unsent = False
                body = self.progress.model_dump(by_alias=True, exclude_none=True, exclude={"updated_at"})
                try:
                    reply = await client.post(self.ctx.progress_url, json=body, headers=headers)
                    if reply.status_code != 200:
                        log.warning("progress report refused: HTTP %d %s", reply.status_code, reply.text[:200])
                except httpx.HTTPError as e:
                    log.warning("cannot report progress to %s: %s", self.ctx.progress_url, e)
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        """Wait until the last progress report has been sent."""
        if self._pusher is not None:
            await self._pusher

    async def wait_for_peers(self, timeout: float = 600.0) -> None:
        """Wait until every replica of every role answers /readyz (pods of a job start in any order)."""
        pending = {url for role, urls in self.ctx.peers.items() if role != "controller" for url in urls}
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5.0) as client:
            while pending:
                for url in sorted(pending):
                    try:
                        if (await client.get(f"{url}/readyz")).status_code == 200:
                            pending.discard(url)
                    except httpx.TransportError:
                        pass
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"peers not ready after {timeout:.0f} s: {', '.join(sorted(pending))}")
                if pending:
                    await asyncio.sleep(0.5)
        log.info("all peers ready")
