"""The sender's data plane: what the trainer's rank 0 runs to pack and broadcast the buckets.

`WeightSender` owns rank 0's membership of the group, the bucket buffers and the ready
handshake through the store; it reaches the generators only through a `ControlPlane`
(control.py), HTTP by default. See the package docstring for the call sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kubeforge.weight_sync.control import ControlPlane, HttpControlPlane
from kubeforge.weight_sync.group import (
    DEFAULT_TIMEOUT_S,
    LATEST_VERSION_KEY,
    SyncGroup,
    default_backend,
    join_group,
    open_store,
    parse_addr,
)
from kubeforge.weight_sync.plan import DEFAULT_BUCKET_BYTES, Bucket, ParamSpec, PlanMemo, max_bucket_bytes, views

log = logging.getLogger("kubeforge.weight_sync")


@dataclass
class SendStats:
    version: int
    seconds: float
    bytes: int
    buckets: int
    generators: list[dict] = field(default_factory=list)  # each generator's /weights/update answer


def _materialize(tensor: torch.Tensor) -> torch.Tensor:
    # An FSDP-sharded parameter (DTensor) gathers its full value here, a collective that every
    # trainer rank must enter in the same order; plain tensors pass through.
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def gather_only(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """What trainer ranks other than 0 run while rank 0 sends: the same gathers, nothing sent."""
    for _, tensor in named_tensors:
        _materialize(tensor)


class WeightSender:
    """Rank 0 of the weight-sync group: packs parameters into buckets and broadcasts them.

    Only global trainer rank 0 builds one. With an FSDP model, every trainer rank must still
    iterate the same parameters in the same order (each `full_tensor()` is a collective);
    ranks other than 0 iterate and drop them.
    """

    def __init__(
        self,
        addr: str,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        backend: str | None = None,
        device: torch.device | str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token: str = "",
        control: ControlPlane | None = None,
    ):
        self.addr = addr
        self.bucket_bytes = bucket_bytes
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.backend = backend or default_backend(self.device)
        self.timeout_s = timeout_s
        # How the generators are asked to join and to update: over HTTP, presenting `token`, unless
        # another `control` is given.
        self.control: ControlPlane = control or HttpControlPlane(token=token, timeout_s=timeout_s)
        self.generator_urls: list[str] = []
        self.group: SyncGroup | None = None
        self._store: dist.TCPStore | None = None
        self._formation = 0
        self._updates = 0
        self._buffers = [torch.empty(0, dtype=torch.uint8, device=self.device)] * 2  # see broadcast
        self._plan = PlanMemo()
        # The plan last packed and each bucket's typed views into its buffer (see _views).
        self._views_of: tuple[Sequence[Bucket] | None, list[list[tuple[ParamSpec, torch.Tensor]]]] = (None, [])

    # -- group membership -------------------------------------------------------------------

    def connect(self, generator_urls: Sequence[str]) -> int:
        """(Re)form the group with every generator in `generator_urls`; return its world size.

        Call again after a generator restarted or joined late (then `send` the current
        weights): the group is formed anew, under a fresh name, on the same store.
        """
        urls = [u.rstrip("/") for u in generator_urls]
        workers = self.control.workers(urls)
        world_size = 1 + sum(workers)
        offsets = [1 + sum(workers[:i]) for i in range(len(urls))]
        group = self._next_group_name()
        host, port = parse_addr(self.addr)
        bodies = [
            {
                "master_address": host,
                "master_port": port,
                "world_size": world_size,
                "rank_offset": offset,
                "backend": self.backend,
                "group": group,
                "timeout_s": self.timeout_s,
            }
            for offset in offsets
        ]
        self.close()
        # Generators block in /weights/init until rank 0 joins too: post first, then join.
        self.control.init(urls, bodies, lambda: self.join(group, world_size))
        self.generator_urls = urls
        log.info("weight-sync group %s formed: %d generator(s), world size %d", group, len(urls), world_size)
        return world_size

    def join(self, group: str, world_size: int) -> SyncGroup:
        """Join `group` as rank 0 without HTTP (for callers that drive the generators themselves)."""
        if self._store is None:
            self._store = open_store(self.addr, is_master=True, timeout_s=self.timeout_s)
        self.group = join_group(
            self._store,
            group=group,
            rank=0,
            world_size=world_size,
            backend=self.backend,
            device=self.device,
            timeout_s=self.timeout_s,
        )
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    # -- one update ---------------------------------------------------------------------------

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        *,
        params: Sequence[ParamSpec | Sequence] | None = None,
    ) -> SendStats:
        """Push one full set of weights to every connected generator as policy `version`.

        `named_tensors` yields (generator name, tensor) in the order of `params`; each tensor is
        cast to its spec's dtype while packing. Without `params`, the tensors are collected
        first and described as they are (fine for small models; give `params` for big or
        sharded ones so that nothing is gathered twice).
        """
        if self.group is None:
            raise RuntimeError("WeightSender.send before connect(): no weight-sync group")
        if params is None:
            named_tensors = list(named_tensors)
            params = [ParamSpec.of(n, t) for n, t in named_tensors]
        plan, digest = self._plan(params, self.bucket_bytes)
        self._updates += 1
        update_id = f"{self.group.prefix.rsplit('/', 1)[-1]}-{self._updates}"
        body = {
            "version": int(version),
            "params": [entry.param.to_json() for bucket in plan for entry in bucket.entries],
            "bucket_bytes": self.bucket_bytes,
            "update_id": update_id,
        }
        start = time.perf_counter()

        def transfer(futures: Sequence[Future]) -> int:
            # The first bucket is gathered and packed while the generators pause and get ready.
            return self.broadcast(named_tensors, plan, ready=lambda: self.wait_ready(update_id, digest, futures))

        nbytes, answers = self.control.update(self.generator_urls, body, transfer)
        seconds = time.perf_counter() - start
        log.info("weights v%d sent: %.1f MB in %d bucket(s), %.3f s", version, nbytes / 1e6, len(plan), seconds)
        # A generator that starts later reads this and waits for these weights before serving.
        self.group.store.set(LATEST_VERSION_KEY, str(int(version)))
        return SendStats(int(version), seconds, nbytes, len(plan), answers)

    def wait_ready(self, update_id: str, digest: str, futures: Sequence[Future] = ()) -> None:
        """Wait until every receiving rank announced the same plan, or fail fast on an HTTP error.

        Without it, a generator that refuses an update would leave rank 0 blocked in a
        broadcast until the collective times out.
        """
        assert self.group is not None
        keys = [self.group.key(f"ready/{update_id}/{r}") for r in range(1, self.group.world_size)]
        deadline = time.monotonic() + self.timeout_s
        # Poll with check(), not wait(): wait() with a short timeout logs a warning per timeout.
        # Short naps first: a receiver that is already waiting is usually ready within a millisecond.
        nap = 1e-4
        while not self.group.store.check(keys):
            for f in futures:
                if f.done():
                    f.result()  # raises the generator's refusal; a success this early is a bug
                    raise RuntimeError("a generator answered /weights/update before receiving anything")
            if time.monotonic() > deadline:
                raise TimeoutError(f"generators not ready for weight update {update_id} after {self.timeout_s} s")
            time.sleep(nap)
            nap = min(2 * nap, 0.01)
        digests = {self.group.store.get(k).decode() for k in keys}
        for k in keys:
            self.group.store.delete_key(k)
        if digests != {digest}:
            raise RuntimeError(f"receivers cut a different bucket plan: {sorted(digests)} vs {digest}")

    def broadcast(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        plan: Sequence[Bucket],
        ready: Callable[[], None] | None = None,
    ) -> int:
        """Pack and broadcast every bucket of `plan`; return the bytes sent.

        `ready` (the receivers' handshake) is called once the first bucket is packed, before it
        is broadcast. Two buffers take turns, so that packing bucket k+1 (the trainer's gather and
        the copies in) overlaps bucket k on the wire: each broadcast is started asynchronously
        (NCCL runs it on its own stream once the packing queued before it is done; gloo in its own
        thread), and a buffer is waited on only when its turn to be packed comes again, two
        buckets later. The receivers see the same buckets in the same order: their plan does not change.
        """
        assert self.group is not None
        if not plan and ready is not None:
            ready()
        self._reserve(max_bucket_bytes(plan))
        tensors = iter(named_tensors)
        in_flight: list[dist.Work | None] = [None] * len(self._buffers)
        sent = 0
        for k, (bucket, bucket_views) in enumerate(zip(plan, self._views(plan), strict=True)):
            turn = k % len(self._buffers)
            if in_flight[turn] is not None:
                in_flight[turn].wait()  # this buffer's previous bucket has left: it may be overwritten
            for spec, view in bucket_views:
                name, tensor = next(tensors, (None, None))
                if name != spec.name:
                    raise ValueError(f"expected parameter {spec.name!r} next, got {name!r}")
                tensor = _materialize(tensor)
                if tensor.shape != spec.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} but {spec.shape} was announced")
                view.copy_(tensor.detach())  # casts to the wire dtype and moves to the group's device
            if k == 0 and ready is not None:
                ready()
            in_flight[turn] = self.group.broadcast(self._buffers[turn][: bucket.nbytes], src=0, async_op=True)
            sent += bucket.nbytes
        for work in in_flight:
            if work is not None:
                work.wait()
        extra = next(tensors, None)
        if extra is not None:
            raise ValueError(f"more tensors than announced parameters, starting with {extra[0]!r}")
        return sent

    # -- helpers ------------------------------------------------------------------------------

    def _reserve(self, nbytes: int) -> None:
        # Two buffers for every bucket and every update: no allocation on the hot path.
        if self._buffers[0].numel() < nbytes:
            self._buffers = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self._views_of = (None, [])

    def _views(self, plan: Sequence[Bucket]) -> list[list[tuple[ParamSpec, torch.Tensor]]]:
        """Each bucket's typed views into the buffer it is packed in, made once per plan: the
        buffers and the plan outlive an update, and making the views costs host time per parameter.
        Keyed on the plan object itself: `PlanMemo` hands back the same one while the parameters
        stay the same, so checking costs nothing per parameter."""
        if self._views_of[0] is not plan:
            buffers = self._buffers
            made = [list(views(buffers[k % len(buffers)][: b.nbytes], b)) for k, b in enumerate(plan)]
            self._views_of = (plan, made)
        return self._views_of[1]

    def _next_group_name(self) -> str:
        self._formation += 1
        return f"g{self._formation}-{int(time.time())}"
