"""The process group: a standalone torch.distributed group that leaves the default group alone.

The trainer (rank 0) and every generator worker (ranks 1..N) form a group of their own,
rendezvousing at KUBEFORGE_WEIGHT_SYNC_ADDR: gloo on CPU, NCCL on GPU, the same code. The
trainer serves the rendezvous store; besides the group's own keys it holds the receivers'
ready handshakes and the last policy version sent, for generators that (re)start.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("kubeforge.weight_sync")

DEFAULT_TIMEOUT_S = 300.0
STORE_PREFIX = "kubeforge/weight-sync"
# The last policy version the trainer sent, kept in its store for generators that (re)start.
LATEST_VERSION_KEY = f"{STORE_PREFIX}/latest-version"


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"weight-sync address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def open_store(addr: str, *, is_master: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """The rendezvous store: the trainer (rank 0) serves it, generator workers connect to it."""
    host, port = parse_addr(addr)
    return dist.TCPStore(
        host,
        port,
        is_master=is_master,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


@dataclass
class SyncGroup:
    """One rank's membership of the weight-sync group.

    Built on the backend classes directly (ProcessGroupGloo / ProcessGroupNCCL over a
    PrefixStore) rather than `init_process_group`: the trainer already has a default group
    (torchrun's) and vLLM's worker has its own, and neither may be disturbed.
    """

    store: dist.Store  # the raw store; keys used for handshakes live under `prefix`
    prefix: str
    pg: dist.ProcessGroup
    rank: int
    world_size: int
    backend: str
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> dist.Work | None:
        """Broadcast `tensor` from `src`; with `async_op`, return the work to wait on before touching it again."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        work = self.pg.broadcast([tensor], opts)
        if async_op:
            return work
        work.wait()
        return None

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def close(self) -> None:
        # Dropping the backend object tears its connections down; NCCL wants an explicit abort.
        shutdown = getattr(self.pg, "shutdown", None) or getattr(self.pg, "abort", None)
        if self.backend == "nccl" and callable(shutdown):
            try:
                shutdown()
            except Exception as e:  # a peer may already be gone
                log.debug("closing the weight-sync group: %s", e)
        self.pg = None  # type: ignore[assignment]


def join_group(
    store: dist.Store,
    *,
    group: str,
    rank: int,
    world_size: int,
    backend: str,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> SyncGroup:
    """Join weight-sync group `group` (a name unique per formation) as `rank` of `world_size`.

    Blocks until every rank has joined: a one-element broadcast from rank 0 checks the group
    end to end (and makes NCCL, which connects lazily, connect now).
    """
    prefix = f"{STORE_PREFIX}/{group}"
    prefixed = dist.PrefixStore(prefix + "/pg", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"the nccl backend needs a CUDA device, got {device}")
        torch.cuda.set_device(device)
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, timeout)
    else:
        raise ValueError(f"weight-sync backend {backend!r}: expected gloo or nccl")
    sync = SyncGroup(store, prefix, pg, rank, world_size, backend, device)
    probe = torch.full((1,), world_size if rank == 0 else -1, dtype=torch.int64, device=device)
    sync.broadcast(probe)
    if int(probe.item()) != world_size:
        raise RuntimeError(f"weight-sync group {group}: rank 0 expects {int(probe.item())} ranks, not {world_size}")
    return sync


def latest_version(addr: str, timeout_s: float = 5.0) -> int | None:
    """The policy version the trainer at `addr` last sent, or None (no trainer there, or nothing sent yet).

    A generator asks at start-up: if the job already trained past its checkpoint on disk, it
    must not serve until the trainer has sent it the current weights. Raises RuntimeError when
    something listens at `addr` but does not answer as a store: TCPStore's client would wait
    on it forever.
    """
    answer: list[int | None] = []
    probe = threading.Thread(
        target=lambda: answer.append(_read_latest_version(addr, timeout_s)), name="weight-sync-probe", daemon=True
    )
    probe.start()
    probe.join(2 * timeout_s)  # connect, then one request
    if not answer:
        raise RuntimeError(
            f"{addr} (KUBEFORGE_WEIGHT_SYNC_ADDR) accepts connections but did not answer as the trainer's "
            f"weight-sync store within {2 * timeout_s:.0f} s: another program holds that port"
        )
    return answer[0]


def _read_latest_version(addr: str, timeout_s: float) -> int | None:
    import socket

    try:
        # A plain connect first: TCPStore retries a refused connection until its timeout and
        # then logs a C++ stack trace, the wrong tone for "no trainer yet".
        socket.create_connection(parse_addr(addr), timeout=timeout_s).close()
        store = open_store(addr, is_master=False, timeout_s=timeout_s)
        if store.check([LATEST_VERSION_KEY]):
            return int(store.get(LATEST_VERSION_KEY))
    except (OSError, RuntimeError) as e:  # refused, unreachable, or a store that stopped answering
        log.debug("no weight-sync store at %s: %s", addr, e)
    return None
