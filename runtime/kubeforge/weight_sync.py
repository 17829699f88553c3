"""Trainer-to-generator weight sync: the protocol both sides share.

The trainer (rank 0) and every generator worker (ranks 1..N) form a torch.distributed group of
their own, rendezvousing at KUBEFORGE_WEIGHT_SYNC_ADDR: gloo on CPU, NCCL on GPU, the same code.
Parameters travel in the generator's (HF) names, dtypes and shapes, packed into flat byte
buckets of a configurable size. Both sides cut the buckets with `plan_buckets` from the same
parameter list, so only the list (JSON, over HTTP) and the bytes (broadcast) cross the wire.

The trainer's call sequence (`WeightSender`; urls are the generators' base URLs):

    sender = WeightSender("trainer-0.host:29600", bucket_bytes=64 << 20)
    sender.connect(generator_urls)                 # once, and again when a generator (re)joins
    stats = sender.send(named_tensors, version=1)  # after each train step that should be synced
    sender.close()

`connect` asks each generator how many workers it has (GET /weights/info), POSTs /weights/init
to all of them and joins the group as rank 0. `send` POSTs /weights/update (version and the
parameter list) to all of them, waits until every receiving worker has said through the
rendezvous store that it is paused and ready, broadcasts the buckets, and returns once every
generator has answered that it loaded the weights and bumped its policy version.

This module must not import vLLM: the trainer imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("kubeforge.weight_sync")

DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_TIMEOUT_S = 300.0
# Every tensor starts at a multiple of this many bytes inside its bucket, so that a byte view
# can be reinterpreted as any dtype (the widest, complex128, needs 16).
ALIGN_BYTES = 16
STORE_PREFIX = "kubeforge/weight-sync"
# The last policy version the trainer sent, kept in its store for generators that (re)start.
LATEST_VERSION_KEY = f"{STORE_PREFIX}/latest-version"


# ---------------------------------------------------------------------------------------------
# The bucket plan: identical on both sides


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the generator names and holds it: the unit of the wire format."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.name}: {self.dtype!r} is not a torch dtype")
        return dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape)]

    @classmethod
    def parse(cls, value: ParamSpec | Sequence) -> ParamSpec:
        """Accept a ParamSpec or a JSON triple [name, dtype, shape]."""
        if isinstance(value, ParamSpec):
            return value
        name, dtype, shape = value
        return cls(str(name), str(dtype).removeprefix("torch."), tuple(int(d) for d in shape))

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> ParamSpec:
        """The spec of `tensor` (its global shape, also for a DTensor), sent as `dtype` if given."""
        return cls(name, dtype_name(dtype or tensor.dtype), tuple(tensor.shape))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BucketEntry:
    param: ParamSpec
    offset: int  # bytes from the start of the bucket


@dataclass(frozen=True)
class Bucket:
    entries: tuple[BucketEntry, ...]
    nbytes: int


def _align(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def plan_buckets(params: Iterable[ParamSpec | Sequence], bucket_bytes: int) -> list[Bucket]:
    """Cut `params`, in their order, into buckets of at most `bucket_bytes` bytes.

    Deterministic: sender and receiver call it with the same list and get the same plan. A
    parameter larger than `bucket_bytes` travels alone in a bucket of its own size (splitting
    it would make the receiver reassemble it before vLLM could load it).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    entries: list[BucketEntry] = []
    used = 0
    for param in map(ParamSpec.parse, params):
        start = _align(used)
        if entries and start + param.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(entries), used))
            entries, start = [], 0
        entries.append(BucketEntry(param, start))
        used = start + param.nbytes
    if entries:
        buckets.append(Bucket(tuple(entries), used))
    return buckets


def plan_digest(plan: Sequence[Bucket]) -> str:
    """A short fingerprint of a plan: the sender checks that every receiver cut the same one."""
    flat = [[b.nbytes, [[e.param.to_json(), e.offset] for e in b.entries]] for b in plan]
    return hashlib.sha256(json.dumps(flat).encode()).hexdigest()[:16]


class PlanMemo:
    """The bucket plan and digest of the last parameter list it was given, cut again only when that
    list or the bucket size changes. Every update of a job sends the same parameters, and cutting
    and fingerprinting a plan costs host time per parameter on an update's critical path (a
    receiver cuts its plan before it announces ready)."""

    def __init__(self) -> None:
        self._key: tuple[list, int] | None = None
        self._plan: tuple[list[Bucket], str] = ([], "")

    def __call__(self, params: Sequence[ParamSpec | Sequence], bucket_bytes: int) -> tuple[list[Bucket], str]:
        if self._key != (params, bucket_bytes):
            plan = plan_buckets(params, bucket_bytes)
            self._key, self._plan = (list(params), bucket_bytes), (plan, plan_digest(plan))
        return self._plan


def max_bucket_bytes(plan: Sequence[Bucket]) -> int:
    return max((b.nbytes for b in plan), default=0)


def views(buffer: torch.Tensor, bucket: Bucket) -> Iterator[tuple[ParamSpec, torch.Tensor]]:
    """Each parameter of `bucket` as a typed, shaped view into the flat byte `buffer`."""
    for entry in bucket.entries:
        p = entry.param
        raw = buffer[entry.offset : entry.offset + p.nbytes]
        yield p, raw.view(p.torch_dtype).view(p.shape)


# ---------------------------------------------------------------------------------------------
# The group: a standalone process group that leaves torch.distributed's default group alone


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


# ---------------------------------------------------------------------------------------------
# Receiver: what a generator worker runs (vLLM's worker-side engine wraps it)


class WeightReceiver:
    """Receives each bucket into a buffer of its own and hands typed views of it to `load`.

    `load` gets `[(name, tensor), ...]` per bucket: views into that bucket's buffer, which no
    later bucket overwrites. vLLM's layer-wise reload may keep a layer's tensors until all of its
    weights have arrived (q/k/v and gate/up are fused), possibly buckets later; a buffer lives as
    long as a view of it does, and goes back to the caching allocator after. No copy is made here.
    """

    def __init__(self, group: SyncGroup):
        self.group = group
        self._plan = PlanMemo()

    def announce_ready(self, update_id: str, digest: str) -> None:
        """Tell the sender this rank is paused and will receive the plan with `digest`."""
        self.group.store.set(self.group.key(f"ready/{update_id}/{self.group.rank}"), digest)

    def receive(
        self,
        params: Sequence[ParamSpec | Sequence],
        bucket_bytes: int,
        load: Callable[[list[tuple[str, torch.Tensor]]], object],
        *,
        update_id: str | None = None,
    ) -> int:
        """Receive every bucket of the plan, calling `load` after each; return the bytes received.

        Bucket k+1's broadcast is posted before bucket k is loaded, so that it crosses the wire
        meanwhile (NCCL starts it once the work queued before it on the current stream is done:
        bucket k-1's load at most).
        """
        plan, digest = self._plan(params, bucket_bytes)
        if update_id is not None:
            self.announce_ready(update_id, digest)

        def post(bucket: Bucket) -> tuple[dist.Work | None, torch.Tensor]:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.group.device)
            return self.group.broadcast(buffer, src=0, async_op=True), buffer

        received = 0
        upcoming = post(plan[0]) if plan else None
        for k, bucket in enumerate(plan):
            work, buffer = upcoming
            upcoming = post(plan[k + 1]) if k + 1 < len(plan) else None
            if work is not None:
                work.wait()
            load([(p.name, view) for p, view in views(buffer, bucket)])
            received += bucket.nbytes
        return received


# ---------------------------------------------------------------------------------------------
# Sender: what the trainer runs


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
    ):
        self.addr = addr
        self.bucket_bytes = bucket_bytes
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.backend = backend or default_backend(self.device)
        self.timeout_s = timeout_s
        self.token = token
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
        import httpx

        urls = [u.rstrip("/") for u in generator_urls]
        with httpx.Client(timeout=30, headers=self._headers()) as http:
            workers = [int(self._check(http.get(f"{u}/weights/info")).json()["workers"]) for u in urls]
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
        requests = [(f"{u}/weights/init", body) for u, body in zip(urls, bodies, strict=True)]
        self._alongside(requests, lambda _futures: self.join(group, world_size))
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
        requests = [(f"{u}/weights/update", body) for u in self.generator_urls]

        def transfer(futures: Sequence[Future]) -> int:
            # The first bucket is gathered and packed while the generators pause and get ready.
            return self.broadcast(named_tensors, plan, ready=lambda: self.wait_ready(update_id, digest, futures))

        nbytes, answers = self._alongside(requests, transfer)
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

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _post(self, url: str, body: dict) -> dict:
        import httpx

        with httpx.Client(timeout=self.timeout_s + 30, headers=self._headers()) as http:
            return self._check(http.post(url, json=body)).json()

    @staticmethod
    def _check(response):
        if response.status_code >= 400:
            request = response.request
            raise RuntimeError(f"{request.method} {request.url}: {response.status_code} {response.text}")
        return response

    def _alongside(
        self, requests: Sequence[tuple[str, dict]], action: Callable[[Sequence[Future]], object]
    ) -> tuple[object, list[dict]]:
        """POST `requests` concurrently while `action` runs here; return its result and the answers.

        The generators' answers come only after the collective that `action` drives, so they
        are waited for after it. If `action` fails, they are not: a generator still blocked in
        the collective would make the wait a hang (its own timeout frees it).
        """
        pool = ThreadPoolExecutor(max_workers=max(1, len(requests)), thread_name_prefix="weight-sync-http")
        futures = [pool.submit(self._post, url, body) for url, body in requests]
        try:
            result = action(futures)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        try:
            return result, [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------
# `python -m kubeforge.weight_sync`: check the transport on this machine and measure it


def _check_rank(rank: int, world_size: int, addr: str, backend: str, params: list[ParamSpec], args) -> None:
    """One process of the self-check: rank 0 sends `args.rounds` times, the others receive and verify."""
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if rank == 0:
        sender = WeightSender(addr, bucket_bytes=args.bucket_mb << 20, backend=backend, device=device)
        sender.join("check", world_size)
        # Parameter i is filled with i: the receivers check every element without a reference copy.
        tensors = [(p.name, torch.full(p.shape, i, dtype=p.torch_dtype, device=device)) for i, p in enumerate(params)]
        plan = plan_buckets(params, sender.bucket_bytes)
        protocol: list[float] = []
        for round_ in range(args.rounds + 1):  # round 0 warms up (NCCL connects, buffers are allocated)
            sender.wait_ready(f"r{round_}", plan_digest(plan))
            start = time.perf_counter()
            nbytes = sender.broadcast(tensors, plan)
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if round_:
                protocol.append(seconds)
                print(f"round {round_}: {nbytes / 1e9:.3f} GB in {len(plan)} bucket(s), {seconds * 1e3:.1f} ms, "
                      f"{nbytes / seconds / 1e9:.1f} GB/s", flush=True)  # fmt: skip
        total = sum(p.nbytes for p in params)  # the receivers size theirs the same way
        raw = [_raw_broadcast(sender.group, total) for _ in range(args.rounds + 1)][1:]
        best, floor = min(protocol), min(raw)
        print(f"baseline, raw broadcast of the same {total / 1e9:.3f} GB in one piece: {floor * 1e3:.1f} ms; "
              f"protocol best {best * 1e3:.1f} ms = {best / floor:.2f}x the baseline", flush=True)  # fmt: skip
        sender.close()
        return
    store = open_store(addr, is_master=False)
    receiver = WeightReceiver(
        join_group(store, group="check", rank=rank, world_size=world_size, backend=backend, device=device)
    )
    index = {p.name: i for i, p in enumerate(params)}
    wrong: list[str] = []

    def verify(batch: list[tuple[str, torch.Tensor]]) -> None:
        wrong.extend(name for name, t in batch if not bool((t == index[name]).all()))

    for round_ in range(args.rounds + 1):
        receiver.receive(params, args.bucket_mb << 20, verify, update_id=f"r{round_}")
    total = sum(p.nbytes for p in params)
    for _ in range(args.rounds + 1):
        _raw_broadcast(receiver.group, total)
    if wrong:
        raise SystemExit(f"rank {rank}: wrong values in {wrong[:5]}")
    print(f"rank {rank}: every parameter arrived intact, {args.rounds + 1} rounds", flush=True)


def _raw_broadcast(group: SyncGroup, nbytes: int) -> float:
    """The baseline: one broadcast of `nbytes` from a preallocated buffer, no protocol; seconds."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=group.device)
    start = time.perf_counter()
    group.broadcast(buffer)
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    import argparse
    import socket

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(
        prog="python -m kubeforge.weight_sync",
        description="Send synthetic weights from rank 0 to N receivers on this machine with the "
        "weight-sync protocol, check every byte, and print the bandwidth.",
    )
    parser.add_argument("--receivers", type=int, default=1, help="receiving processes (GPUs 1..N with nccl)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--mb", type=int, default=256, help="total weight size in MiB")
    parser.add_argument("--param-mb", type=int, default=16, help="size of each parameter in MiB")
    parser.add_argument("--bucket-mb", type=int, default=64, help="bucket size in MiB")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    itemsize = getattr(torch, args.dtype).itemsize
    count = max(1, args.mb // args.param_mb)
    params = [ParamSpec(f"layers.{i}.weight", args.dtype, ((args.param_mb << 20) // itemsize,)) for i in range(count)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    world_size = 1 + args.receivers
    mp.start_processes(
        _check_entry, args=(world_size, addr, args.backend, params, args), nprocs=world_size, start_method="spawn"
    )


def _check_entry(rank: int, *rest) -> None:
    logging.basicConfig(level=logging.WARNING)
    _check_rank(rank, *rest)


if __name__ == "__main__":
    main()
