"""The generator role's body: start the engine, serve its routes, watch it."""

from __future__ import annotations

import asyncio
import logging

from kubeforge import serving, weight_sync
from kubeforge.generator import engine as engine_setup
from kubeforge.generator import metrics
from kubeforge.generator.service import Generator, add_openai_routes, add_policy_version_header, add_routes

log = logging.getLogger("kubeforge.generator")

ENGINE_CHECK_INTERVAL_S = 2.0


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
        await watch(engine)
    finally:
        engine.shutdown()


async def hold_for_current_weights(generator: Generator) -> bool:
    """Whether the trainer already sent newer weights than the ones on disk; if so, hold the replica.

    A replica that starts late or restarts mid-job must not serve an old policy: it then stays
    not ready, and refuses generation, until the trainer has re-formed the group and sent them
    (its weight routes work).
    """
    addr = generator.server.ctx.weight_sync_addr
    latest = await asyncio.to_thread(weight_sync.latest_version, addr) if addr else None
    if latest:
        log.info("the trainer is at policy version %d: waiting for its weights before serving", latest)
        generator.wait_for_weights(latest)
    return bool(latest)


async def watch(engine) -> None:
    """Return never; raise when the engine core died, so that the role exits non-zero."""
    while True:
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
        if engine.errored:
            raise RuntimeError("the vLLM engine stopped: see the lines above for its error")
