"""The generator role's body: start the engine, serve its routes, watch it."""

from __future__ import annotations

import asyncio
import logging

import httpx

from kubeforge import auth, serving, weight_sync
from kubeforge.generator import engine as engine_setup
from kubeforge.generator import metrics
from kubeforge.generator.service import Generator, add_openai_routes, add_policy_version_header, add_routes

log = logging.getLogger("kubeforge.generator")

ENGINE_CHECK_INTERVAL_S = 2.0
TRAINER_ANSWER_S = 30.0  # a trainer busy in a long step still answers its API (the step runs in a thread)


async def run(server: serving.RoleServer) -> None:
    """Build the vLLM engine from the spec, add the routes, become ready, serve until stopped."""
    ctx = server.ctx
    generator: Generator | None = None
    # Before the first await: Starlette takes middleware only until the first request.
    add_policy_version_header(server.app, lambda: generator.policy_version if generator else 0)
    engine_setup.check_model_dir(ctx.spec.model.path)
    engine_setup.prepare_environment(ctx)
    args = engine_setup.parse_engine_args(engine_setup.engine_argv(ctx))
    server.set_not_ready("starting the vLLM engine")
    log.info("starting vLLM on %s", ctx.spec.model.path)
    engine = await engine_setup.start_engine(args, stat_loggers=[metrics.stat_logger_factory(serving.role_labels(ctx))])
    try:
        await engine.update_weight_version("0")  # vLLM labels sampled tokens with it
        generator = Generator(server, engine, args)
        # Decided before any route exists: in between, a restarted replica would answer /generate
        # from the weights on disk, and its samples would be too old to train on.
        behind = await hold_for_current_weights(generator)
        add_routes(server.app, generator)
        await add_openai_routes(server.app, generator)
        if not behind:
            server.set_ready()
        await watch(generator)
    finally:
        engine.shutdown()


def version_to_wait_for(stored: int | None, confirmed: int | None) -> int | None:
    """The policy version a starting replica holds out for, or None to serve the weights on disk.

    `stored` is what the weight-sync store says the trainer last sent; any pod that reaches the
    store could have written it. `confirmed` is the trainer's own policy version, read from its
    API with the job token (None: the trainer did not answer). A replica never waits on a version
    the trainer cannot confirm: a forged key would otherwise hold it out forever.
    """
    if not stored or confirmed is None:
        return None
    if stored > confirmed:
        return confirmed or None  # the store claims more than the trainer holds: believe the trainer
    return stored


async def hold_for_current_weights(generator: Generator) -> bool:
    """Whether the trainer already sent newer weights than the ones on disk; if so, hold the replica.

    A replica that starts late or restarts mid-job must not serve an old policy: it then stays
    not ready, and refuses generation, until the trainer has re-formed the group and sent them
    (its weight routes work).
    """
    ctx = generator.server.ctx
    addr = ctx.weight_sync_addr
    stored = await asyncio.to_thread(weight_sync.latest_version, addr) if addr else None
    if not stored:
        return False
    confirmed = await trainer_policy_version(ctx.peers.get("trainer", []), ctx.token)
    wanted = version_to_wait_for(stored, confirmed)
    if wanted is None:
        log.warning(
            "the weight-sync store says policy version %d but the trainer %s; serving the weights on disk",
            stored,
            "did not answer" if confirmed is None else f"is at version {confirmed}",
        )
        return False
    if wanted != stored:
        log.warning("the weight-sync store says policy version %d, the trainer holds %d: waiting for %d",
                    stored, confirmed, wanted)  # fmt: skip
    log.info("the trainer is at policy version %d: waiting for its weights before serving", wanted)
    generator.wait_for_weights(wanted)
    return True


async def trainer_policy_version(urls: list[str], token: str, timeout_s: float = TRAINER_ANSWER_S) -> int | None:
    """The trainer's policy version from its own API (rank 0's /weights/names), or None."""
    if not urls:
        return None
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers=auth.bearer(token)) as client:
            reply = await client.get(f"{urls[0].rstrip('/')}/weights/names")
        if reply.status_code == 200:
            return int(reply.json()["policy_version"])
        log.warning("the trainer answered HTTP %d to /weights/names: %s", reply.status_code, reply.text[:200])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        log.warning("cannot ask the trainer for its policy version: %s", e)
    return None


async def watch(generator: Generator) -> None:
    """Return never; raise when the replica cannot serve again, so that the role exits non-zero.

    Which deaths a restart cures: a weight update that stopped half-way (the trainer died
    mid-broadcast, the group broke) leaves a model with layers swapped out, but a fresh process
    loads the weights from disk and the pool re-forms the group to send it the current ones:
    TransientFailure, restarted by the default rules. An engine core that died on its own error
    (a bad request, a vLLM bug) would die the same way again: a plain error, which fails the job
    unless a failurePolicy rule names it.
    """
    while True:
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
        if generator.broken:
            raise serving.TransientFailure(f"{generator.broken}; a fresh replica rejoins the weight-sync group")
        if generator.engine.errored:
            raise RuntimeError("the vLLM engine stopped: see the lines above for its error")
