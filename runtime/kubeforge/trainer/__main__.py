"""`torchrun -m kubeforge.trainer`: one trainer rank.

Every rank builds its shard of the policy (kubeforge.trainer.engine). Global rank 0 serves the
trainer API (kubeforge.trainer.api) and tells the other ranks what to run; they follow. Local
rank 0 of every node serves HTTP (the pod's probes and /metrics hit it); other local ranks
serve nothing and stop on SIGTERM from torchrun.
"""

# ruff: noqa: E402 (the parent-death signal is set before the seconds of importing torch)

from __future__ import annotations

import os
import signal

from kubeforge import processes

# torchrun starts each worker in a session of its own: neither the launcher's process group nor
# its parent-death signal reaches it, and a worker that outlived torchrun would run on as an
# orphan (issue 16). So a worker dies with torchrun. SIGKILL, not SIGTERM: torchrun's own
# shutdown signals its workers and waits for them, so this fires only once torchrun is gone
# without having done so, and a worker deaf to SIGTERM (busy in a step) is exactly the case.
# Set first thing, to leave torchrun as little time as possible to die before it is in place.
if __name__ == "__main__" and "TORCHELASTIC_RUN_ID" in os.environ:
    processes.die_with_parent(signal.SIGKILL)

import asyncio
import logging
import threading

from kubeforge import serving
from kubeforge.contract import RoleContext
from kubeforge.trainer.api import add_routes, in_thread
from kubeforge.trainer.engine import Trainer, init_process_group

log = logging.getLogger("kubeforge.trainer")

# How long rank 0, stopping, waits to tell the other ranks (a step in flight finishes first).
STOP_TIMEOUT_S = 30


async def run(server: serving.RoleServer) -> None:
    """Body of a node's local rank 0: build the rank, then lead (global rank 0) or follow."""
    server.set_not_ready("loading the policy")
    device = await in_thread(init_process_group, server.ctx)
    trainer = await in_thread(Trainer, server.ctx, device)
    if trainer.rank == 0:
        await lead(server, trainer)
    else:
        server.set_ready()
        await in_thread(trainer.follow)


async def lead(server: serving.RoleServer, trainer: Trainer) -> None:
    failure = add_routes(server, trainer)
    server.set_ready()
    try:
        await failure  # serve until stopped, or until a command failed on the ranks
    finally:
        # Stopping (SIGTERM): release the other ranks from their wait for the next command.
        try:
            await asyncio.wait_for(in_thread(trainer.stop), STOP_TIMEOUT_S)
        except Exception as e:  # they may be gone already: torchrun signals every rank at once
            log.info("could not tell the other ranks to stop: %s", e)


def follower_main() -> None:
    """A rank without HTTP: follow rank 0 in a thread; exit on its stop command or on SIGTERM/SIGINT.

    The work runs in a daemon thread because a thread blocked in a collective cannot be
    interrupted; the main thread only waits for a signal, so SIGTERM always ends the process.
    """
    serving.configure_logging()
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # the work thread inherits the mask
    main_thread = threading.get_ident()
    exit_code = [0]

    def work() -> None:
        try:
            ctx = RoleContext.from_env()
            Trainer(ctx, init_process_group(ctx)).follow()
        except BaseException:
            log.exception("trainer rank failed")
            exit_code[0] = 1
        finally:
            signal.pthread_kill(main_thread, signal.SIGUSR1)

    threading.Thread(target=work, name="trainer-rank", daemon=True).start()
    received = signal.sigwait(signals)
    if received != signal.SIGUSR1:
        log.info("trainer rank stopping on %s", signal.Signals(received).name)
    logging.shutdown()
    # No interpreter teardown: the work thread may still sit in a collective, and destroying its
    # communicator under it aborts the process ("terminate called without an active exception").
    os._exit(exit_code[0])


if __name__ == "__main__":
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        serving.main(run)
    else:
        follower_main()
