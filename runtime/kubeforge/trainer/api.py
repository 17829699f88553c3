"""The trainer API, served by global rank 0: what the controller calls.

    POST /train             body: a batch in its wire form (kubeforge.batch); one optimizer step
    POST /evaluate          body: a batch, as for /train; its loss under the current weights, no update
    POST /checkpoint        JSON {"app_state": {...}} optional; DCP checkpoint now
    POST /weights/publish   JSON {"generators": [urls], "reconnect": bool} optional; weight sync
    POST /weights/export    JSON {"dir": path} optional; the weights as an HF checkpoint
    GET  /weights/names     the HF-named parameters a publish sends: name, dtype, shape
    GET  /status            step, policy version, last checkpoint and the app state saved with it

Only the controller drives the trainer: every route but /weights/names (the job token) needs the
controller's token (kubeforge.auth, checked by the role server before a route runs). A publish goes
only to the job's own generators, and an export writes only under the run or checkpoint directory.
Every POST runs on all ranks (Trainer.run), one at a time, in a thread: the event loop keeps
answering probes and /metrics during a step.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge, Histogram

from kubeforge import limits, serving
from kubeforge.batch import BatchError, TrainBatch
from kubeforge.trainer.commands import Command
from kubeforge.trainer.engine import PublishError, Trainer

LABELS = serving.ROLE_LABELS
STEP = Gauge("kubeforge_trainer_step", "Train steps run.", LABELS)
POLICY_VERSION = Gauge("kubeforge_trainer_policy_version", "Version of the weights the trainer holds.", LABELS)
STEP_SECONDS = Histogram(
    "kubeforge_trainer_step_seconds",
    "Wall time of one train step, all ranks.",
    LABELS,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TOKENS_PER_SECOND = Gauge("kubeforge_trainer_tokens_per_second", "Response tokens per second, last step.", LABELS)
LOSS = Gauge("kubeforge_trainer_loss", "Policy loss of the last step.", LABELS)
GRAD_NORM = Gauge("kubeforge_trainer_grad_norm", "Gradient norm of the last step, before clipping.", LABELS)
STALENESS = Gauge("kubeforge_trainer_staleness", "Policy versions the oldest sample of the last step lagged.", LABELS)
SYNC_SECONDS = Histogram(
    "kubeforge_trainer_weight_sync_seconds",
    "Wall time of one weight publish to the generators.",
    LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SYNC_BYTES = Counter("kubeforge_trainer_weight_sync_bytes", "Bytes of weights published to the generators.", LABELS)

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking (collective) work beside the event loop.

    A daemon thread rather than asyncio.to_thread: a thread stuck in a collective whose peer
    died must not keep the process from exiting on SIGTERM.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        if not future.done():  # the awaiting request may have gone
            future.set_exception(error) if error else future.set_result(result)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=target, name=getattr(fn, "__name__", "work"), daemon=True).start()
    return await future


def export_dir(requested: str | Path, run_dir: Path, checkpoint_dir: Path) -> Path:
    """Where an export may write: under the run directory or the checkpoint directory (the
    checkpoint storage on Kubernetes), never elsewhere on the trainer's filesystem."""
    roots = [Path(run_dir).resolve(), Path(checkpoint_dir).resolve()]
    out = (roots[0] / requested).resolve()  # a relative path is taken from the run directory
    if not any(out.is_relative_to(root) for root in roots):
        raise HTTPException(
            400, f"dir: {requested} is outside the run directory {roots[0]} and the checkpoint directory {roots[1]}"
        )
    return out


def publish_targets(requested: Any, job_generators: list[str]) -> list[str]:
    """The generators a publish goes to: the job's own (the contract's addresses), or a subset of
    them. The sender presents the trainer's token to each, so never to an address a caller chose."""
    if requested is None or requested == []:
        if not job_generators:
            raise HTTPException(400, "no generators to publish to: the job has none")
        return job_generators
    if not isinstance(requested, list) or not all(isinstance(u, str) for u in requested):
        raise HTTPException(400, "generators: a list of the job's generator URLs")
    known = {u.rstrip("/") for u in job_generators}
    strangers = [u for u in requested if u.rstrip("/") not in known]
    if strangers:
        raise HTTPException(
            400,
            f"generators: {', '.join(strangers)} not among the job's generators ({', '.join(sorted(known)) or 'none'})",
        )
    return requested


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def add_routes(server: serving.RoleServer, trainer: Trainer) -> asyncio.Future[None]:
    """Add the API's routes; the returned future fails when a command failed on the ranks.

    A command that raised may have left the ranks out of step (one inside a collective, one
    not): the role must then exit and be restarted from its checkpoint.
    """
    app, ctx = server.app, server.ctx
    labels = serving.role_labels(ctx)
    failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # From the start (a resumed trainer's step is not 0): dashboards see the trainer before its first step.
    STEP.labels(**labels).set(trainer.step)
    POLICY_VERSION.labels(**labels).set(trainer.policy_version)

    async def run(command: Command) -> Any:
        try:
            return await in_thread(trainer.run, command)
        except PublishError as e:  # the ranks are in step: refuse this publish, keep training
            raise HTTPException(502, f"weight sync failed: {e}") from e
        except BatchError as e:  # every rank refused it before any collective (Trainer.train): still in step
            raise HTTPException(400, f"bad batch: {e}") from None
        except Exception as e:
            if not failure.done():
                failure.set_exception(RuntimeError(f"trainer command {command.name!r} failed: {e}"))
            raise HTTPException(500, f"{command.name} failed, the trainer stops: {type(e).__name__}: {e}") from e

    async def checked_batch(request: Request) -> bytes:
        """The request's batch bytes; a bad batch is refused here, before any rank sees it."""
        body = await request.body()
        try:
            batch = TrainBatch.decode(body)
            limits.check_rows(batch.rows)
            trainer.check(batch)  # shape, vocabulary, loss name, staleness
        except BatchError as e:
            raise HTTPException(400, f"bad batch: {e}") from None
        return body

    @app.post("/train")
    async def train(request: Request) -> JSONResponse:
        metrics = await run(Command("train", payload=await checked_batch(request)))
        STEP.labels(**labels).set(metrics["step"])
        POLICY_VERSION.labels(**labels).set(metrics["policy_version"])
        STEP_SECONDS.labels(**labels).observe(metrics["step_seconds"])
        TOKENS_PER_SECOND.labels(**labels).set(metrics["tokens_per_second"])
        LOSS.labels(**labels).set(metrics["loss"])
        GRAD_NORM.labels(**labels).set(metrics["grad_norm"])
        STALENESS.labels(**labels).set(metrics["staleness_max"])
        # JSON has no Infinity or NaN: a step whose gradient overflowed reports them as null
        # (the gauges above keep the values; "updated": false says the step was skipped).
        return JSONResponse(
            {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        )

    @app.post("/evaluate")
    async def evaluate(request: Request) -> dict[str, Any]:
        return await run(Command("evaluate", payload=await checked_batch(request)))

    @app.post("/checkpoint")
    async def checkpoint(request: Request) -> dict[str, Any]:
        app_state = (await json_body(request)).get("app_state")
        path = await run(Command("checkpoint", {"app_state": app_state}))
        return {"path": str(path), "step": trainer.step, "policy_version": trainer.policy_version}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {
            "step": trainer.step,
            "policy_version": trainer.policy_version,
            "world_size": trainer.world_size,
            "staleness": trainer.staleness_totals(),
            "checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
            "app_state": trainer.app_state(),
        }

    @app.get("/weights/names")
    async def weight_names() -> dict[str, Any]:
        return {"policy_version": trainer.policy_version, "weights": trainer.weight_names()}

    @app.post("/weights/export")
    async def export(request: Request) -> dict[str, Any]:
        default = ctx.run_dir / "exports" / f"policy-v{trainer.policy_version}"
        out = export_dir((await json_body(request)).get("dir") or default, ctx.run_dir, trainer.checkpoint_dir)
        path = await run(Command("export", {"dir": str(out)}))
        return {"path": str(path), "policy_version": trainer.policy_version}

    @app.post("/weights/publish")
    async def publish(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        # The generators the spec asks for now: a replica a spec edit added may receive the weights too.
        generators = publish_targets(body.get("generators"), ctx.current_peers("generator"))
        args = {"generators": generators, "reconnect": bool(body.get("reconnect"))}
        result = await run(Command("publish", args))
        SYNC_SECONDS.labels(**labels).observe(result["seconds"])
        SYNC_BYTES.labels(**labels).inc(result["bytes"])
        POLICY_VERSION.labels(**labels).set(result["policy_version"])
        return result

    return failure
