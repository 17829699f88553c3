"""The handle an app's RL loop receives: the spec, the peers, the run directory, progress and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Gauge, Histogram

from kubeforge import auth
from kubeforge.contract import RoleContext
from kubeforge.serving import ROLE_LABELS, role_labels
from kubeforge.spec import Progress, RLJobSpec
from kubeforge.trainer.client import TrainerClient

log = logging.getLogger("kubeforge.controller")

STEP = Gauge("kubeforge_controller_step", "Last finished training step.", ROLE_LABELS)
POLICY_VERSION = Gauge("kubeforge_controller_policy_version", "Policy version of the trainer's weights.", ROLE_LABELS)
REWARD_MEAN = Gauge("kubeforge_controller_reward_mean", "Mean reward of the last step's samples.", ROLE_LABELS)
HELD_OUT_REWARD = Gauge(
    "kubeforge_controller_held_out_reward", "Mean reward on the held-out split, last evaluation.", ROLE_LABELS
)
STALENESS = Gauge(
    "kubeforge_controller_staleness", "Policy versions the oldest sample of the last step lagged.", ROLE_LABELS
)
BUFFER_DEPTH = Gauge("kubeforge_controller_buffer_depth", "Scored episodes waiting for a train step.", ROLE_LABELS)
EPISODES = Gauge(
    "kubeforge_controller_episodes", "Episodes in each state of the job's ledger.", (*ROLE_LABELS, "state")
)
PHASE_SECONDS = Histogram(
    "kubeforge_controller_phase_seconds",
    "Wall time of one phase of a step: generate, reward, train, sync, ...",
    (*ROLE_LABELS, "phase"),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)

# Row keys `Job.record` turns into gauges; besides these: `step`, `policy_version` and
# `reward_mean` (through `report`), `<phase>_seconds` and `episodes`.
ROW_GAUGES = {
    "eval_reward": HELD_OUT_REWARD,
    "staleness_max": STALENESS,
    "buffer_depth": BUFFER_DEPTH,
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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

    @property
    def metrics_path(self) -> Path:
        """RUN_DIR/metrics.jsonl: the app's rows, a JSON object per line (what `kubeforge report` draws)."""
        return self.run_dir / "metrics.jsonl"

    def begin_metrics(self, resumed_step: int | None) -> list[dict[str, Any]]:
        """Make the metrics file this run's: the rows of steps up to `resumed_step`, or none for a
        fresh start (None); returns the rows kept.

        A resumed loop does the steps after its checkpoint again and writes their rows anew; the
        stopped run's rows for them would be there twice. A last line cut short by the stop goes too.
        """
        try:
            lines = self.metrics_path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        kept = []
        for line in lines if resumed_step is not None else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= resumed_step:
                kept.append(row)
        partial = self.metrics_path.with_name(self.metrics_path.name + ".partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
        partial.replace(self.metrics_path)  # all or nothing: a stop now keeps the old file
        return kept

    def urls(self, role: str) -> list[str]:
        """Base URLs of every replica of `role` the spec asks for now (empty if the job has none). On
        Kubernetes they follow spec edits (generators scaled up or down): call again for the current set."""
        return self.ctx.current_peers(role)

    def trainer_client(self) -> TrainerClient:
        """The trainer's API (global rank 0), called with the controller's own token: only the
        controller may train, checkpoint, export or publish (kubeforge.auth)."""
        return TrainerClient(
            self.urls("trainer")[0],
            token=self.ctx.credentials.token(auth.CONTROLLER),
            timeout=self.spec.step_deadline_seconds,  # spec.stepDeadlineSeconds; None: no limit
        )

    def report(
        self,
        step: int,
        *,
        policy_version: int | None = None,
        reward_mean: float | None = None,
        weight_sync_seconds: float | None = None,
        held_out_reward: float | None = None,
    ) -> None:
        """Publish progress: the launcher and the operator show it as the job's status.

        `held_out_reward` is the evaluation after `step`; it replaces the one shown unless that
        one followed a later step (evaluations may finish out of order)."""
        updates: dict[str, Any] = {"step": max(step, self.progress.step), "updated_at": datetime.now(UTC).isoformat()}
        if held_out_reward is not None and step >= (self.progress.held_out_step or 0):
            updates |= {"held_out_reward": held_out_reward, "held_out_step": step}
        for key, value in (
            ("policy_version", policy_version),
            ("reward_mean", reward_mean),
            ("weight_sync_seconds", weight_sync_seconds),
        ):
            if value is not None:
                updates[key] = value
        self.progress = self.progress.model_copy(update=updates)
        STEP.labels(**self._labels).set(self.progress.step)
        POLICY_VERSION.labels(**self._labels).set(self.progress.policy_version)
        if reward_mean is not None:
            REWARD_MEAN.labels(**self._labels).set(reward_mean)
        if self.ctx.progress_url:
            self._unsent = True
            if self._pusher is None or self._pusher.done():
                self._pusher = asyncio.get_running_loop().create_task(self._push())

    def record(self, row: Mapping[str, Any]) -> None:
        """Export one row of the app's per-step numbers as metrics; the app hands its row as is.

        Keys read (others, and values that are not numbers, are left alone):
        `eval_reward` (held-out reward), `staleness_max`, `buffer_depth`, every `<phase>_seconds`
        (generate, reward, train, sync, ...: an observation of
        kubeforge_controller_phase_seconds{phase=...}), `episodes` (state -> count, as the
        episode ledger's counts()), and `step` with `policy_version`, `reward_mean` and
        `sync_seconds`, which are reported as progress (`report`) unless the row is older than
        the progress already reported (an asynchronous evaluation finishing late).
        """
        for key, value in row.items():
            if not _number(value):
                continue
            if key in ROW_GAUGES:
                ROW_GAUGES[key].labels(**self._labels).set(value)
            elif key.endswith("_seconds"):
                PHASE_SECONDS.labels(**self._labels, phase=key.removesuffix("_seconds")).observe(value)
        episodes = row.get("episodes")
        if isinstance(episodes, Mapping):
            for state, count in episodes.items():
                EPISODES.labels(**self._labels, state=state).set(count)
        step = row.get("step")
        held_out = row.get("eval_reward") if _number(row.get("eval_reward")) else None
        if _number(step) and step >= self.progress.step:
            self.report(
                int(step),
                policy_version=row.get("policy_version"),
                reward_mean=row.get("reward_mean"),
                weight_sync_seconds=row.get("sync_seconds"),
                held_out_reward=held_out,
            )
        elif _number(step) and held_out is not None:
            self.report(int(step), held_out_reward=held_out)

    async def _push(self) -> None:
        """Send the newest progress to the operator, at most once a second; a lost report is
        superseded by the next one, so failures are logged, not retried."""
        headers = auth.bearer(self.ctx.credentials.token(auth.CONTROLLER))  # the operator checks the controller's
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

    async def wait_for_peers(self, timeout: float | None = None) -> None:
        """Wait until every replica of every role answers /readyz (pods of a job start in any order).

        `timeout` defaults to spec.startupDeadlineSeconds (None there: no limit), the same bound the
        operator puts on a start, so that a slow image pull on another pod does not fail the controller
        before the job's own deadline."""
        if timeout is None:
            timeout = self.spec.startup_deadline_seconds
        pending = {url for role, urls in self.ctx.peers.items() if role != "controller" for url in urls}
        deadline = time.monotonic() + timeout if timeout is not None else float("inf")
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
