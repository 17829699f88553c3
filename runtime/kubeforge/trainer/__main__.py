"""`torchrun -m kubeforge.trainer`: one trainer rank.

Local rank 0 of every trainer node serves the role's HTTP endpoints (the pod's probes hit
them); global rank 0's server is the trainer API the controller calls. For now the ranks form
their process group and serve the lifecycle; torchtitan training comes with issue 3.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import torch
import torch.distributed as dist

from kubeforge import serving
from kubeforge.contract import RoleContext

log = logging.getLogger("kubeforge.trainer")


def init_process_group(ctx: RoleContext) -> None:
    """Join the trainer's own group; torchrun's environment says where and who."""
    on_gpu = ctx.spec.roles.trainer.gpus_per_node > 0
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    dist.barrier()
    log.info("rank %d of %d joined the trainer group", dist.get_rank(), dist.get_world_size())


async def run(server: serving.RoleServer) -> None:
    await asyncio.to_thread(init_process_group, server.ctx)
    server.set_ready()
    await asyncio.Event().wait()


def follower_main() -> None:
    """Ranks other than a node's local rank 0: no HTTP server, stop on SIGTERM from torchrun."""
    serving.configure_logging()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    init_process_group(RoleContext.from_env())
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        serving.main(run)
    else:
        follower_main()
