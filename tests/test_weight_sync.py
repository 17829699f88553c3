"""kubeforge.weight_sync without vLLM: the bucket plan, the gloo transport, the HTTP handshake.

A stand-in generator (FastAPI + WeightReceiver, in a thread) plays the vLLM side; the real
generator is tested in test_generator.py.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from kubeforge import weight_sync
from kubeforge.launcher import allocate_ports
from kubeforge.weight_sync import ParamSpec, WeightReceiver, WeightSender, plan_buckets, plan_digest

CPU = torch.device("cpu")


def free_port() -> int:
    # Below the ephemeral range, as the launcher picks them (see tests/test_tiny_model.py).
    return allocate_ports(["store"], None)["store"]


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and odd sizes (alignment), and one tensor bigger than the buckets below."""
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(64, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.input_layernorm.weight", torch.randn(7, generator=g)),
        ("model.layers.0.counter", torch.arange(3, dtype=torch.int64)),
        ("lm_head.weight", torch.randn(64, 16, generator=g)),
    ]


# ---------------------------------------------------------------------------------------------
# The plan


def test_plan_is_deterministic_aligned_and_covers_every_parameter_once():
    params = [ParamSpec.of(n, t) for n, t in named_tensors()]
    plan = plan_buckets(params, bucket_bytes=3000)
    again = plan_buckets([p.to_json() for p in params], bucket_bytes=3000)  # as it arrives over JSON
    assert plan == again and plan_digest(plan) == plan_digest(again)

    entries = [e for b in plan for e in b.entries]
    assert [e.param for e in entries] == params
    assert all(e.offset % weight_sync.ALIGN_BYTES == 0 for e in entries)
    for bucket in plan:
        ends = [e.offset + e.param.nbytes for e in bucket.entries]
        assert bucket.nbytes == ends[-1]
        assert bucket.nbytes <= 3000 or len(bucket.entries) == 1  # only a lone big tensor exceeds it
    assert [len(b.entries) for b in plan] == [1, 3, 1]  # 4 KiB embedding alone, then 512 + 28 + 24 B, then lm_head


def test_the_plan_memo_cuts_again_only_when_the_parameters_or_the_bucket_size_change():
    params = [ParamSpec.of(n, t).to_json() for n, t in named_tensors()]
    memo = weight_sync.PlanMemo()
    plan, digest = memo(params, 3000)
    assert (plan, digest) == (plan_buckets(params, 3000), plan_digest(plan))
    assert memo([list(p) for p in params], 3000)[0] is plan  # an equal list, as the next update's body brings
    assert memo(params, 1 << 20)[1] == plan_digest(plan_buckets(params, 1 << 20))
    fewer = params[:-1]
    assert memo(fewer, 1 << 20)[1] == plan_digest(plan_buckets(fewer, 1 << 20))


def test_plan_changes_with_the_bucket_size_and_refuses_nonsense():
    params = [ParamSpec.of(n, t) for n, t in named_tensors()]
    assert len(plan_buckets(params, 1 << 20)) == 1
    assert plan_digest(plan_buckets(params, 1 << 20)) != plan_digest(plan_buckets(params, 3000))
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(params, 0)
    with pytest.raises(ValueError, match="not a torch dtype"):
        ParamSpec.parse(["w", "float99", [2]]).torch_dtype  # noqa: B018


# ---------------------------------------------------------------------------------------------
# The transport: rank 0 and rank 1 over gloo, in two threads of this process


def receive_in_thread(addr: str, group: str, params, bucket_bytes: int, update_id: str, out: dict) -> threading.Thread:
    def run() -> None:
        store = weight_sync.open_store(addr, is_master=False, timeout_s=30)
        sync = weight_sync.join_group(
            store, group=group, rank=1, world_size=2, backend="gloo", device=CPU, timeout_s=30
        )
        batches: list[list[tuple[str, torch.Tensor]]] = []
        try:
            out["bytes"] = WeightReceiver(sync).receive(params, bucket_bytes, batches.append, update_id=update_id)
        except RuntimeError as e:  # the sender gave up half-way
            out["error"] = e
        out["batches"] = batches

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sender_broadcasts_every_bucket_and_the_receiver_gets_exact_copies():
    addr = f"127.0.0.1:{free_port()}"
    named = named_tensors()
    # The trainer holds float32; the generator serves bfloat16 for one of them: cast while packing.
    params = [ParamSpec.of(n, t, torch.bfloat16 if n == "lm_head.weight" else None) for n, t in named]
    out: dict = {}
    thread = receive_in_thread(addr, "t1", [p.to_json() for p in params], 3000, "u1", out)

    sender = WeightSender(addr, bucket_bytes=3000, backend="gloo", device="cpu", timeout_s=30)
    sender.join("t1", world_size=2)
    plan = plan_buckets(params, 3000)
    sender.wait_ready("u1", plan_digest(plan))
    sent = sender.broadcast(iter(named), plan)
    thread.join(30)
    sender.close()

    assert sent == out["bytes"] == sum(b.nbytes for b in plan)
    assert [len(batch) for batch in out["batches"]] == [len(b.entries) for b in plan]  # one load per bucket
    got = dict(item for batch in out["batches"] for item in batch)
    for name, tensor in named:
        expected = tensor.to(torch.bfloat16) if name == "lm_head.weight" else tensor
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
    # Every bucket arrives in a buffer of its own, which no later bucket overwrites (the values
    # above were read after the last one arrived): the views need no copy.
    buffers = [{t.untyped_storage().data_ptr() for _, t in batch} for batch in out["batches"]]
    assert all(len(b) == 1 for b in buffers) and len(set.union(*buffers)) == len(plan)


def test_sender_refuses_tensors_that_do_not_match_the_announced_parameters():
    addr = f"127.0.0.1:{free_port()}"
    named = named_tensors()
    params = [ParamSpec.of(n, t) for n, t in named]
    out: dict = {}
    thread = receive_in_thread(addr, "t2", params, 1 << 20, "u2", out)
    sender = WeightSender(addr, bucket_bytes=1 << 20, backend="gloo", device="cpu", timeout_s=30)
    sender.join("t2", world_size=2)
    try:
        with pytest.raises(ValueError, match="expected parameter 'model.embed_tokens.weight' next"):
            sender.broadcast(iter(named[::-1]), plan_buckets(params, 1 << 20))
    finally:
        sender.close()
    thread.join(30)
    assert "error" in out and out["batches"] == []  # the receiver learns it too, and loaded nothing


# ---------------------------------------------------------------------------------------------
# The HTTP handshake, against a stand-in generator


class FakeGenerator:
    """The generator's weight routes, with WeightReceiver in place of vLLM's layer-wise reload."""

    def __init__(self, refuse_updates: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.version = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.receiver: WeightReceiver | None = None
        app = FastAPI()

        @app.get("/weights/info")
        async def info() -> dict:
            return {"policy_version": self.version, "workers": 1}

        @app.post("/weights/init")
        def init(body: dict, request: Request) -> dict:  # sync: blocks a worker thread, as vLLM's RPC would
            assert request.headers["authorization"] == "Bearer tok"
            addr = f"{body['master_address']}:{body['master_port']}"
            store = weight_sync.open_store(addr, is_master=False, timeout_s=body["timeout_s"])
            group = weight_sync.join_group(
                store,
                group=body["group"],
                rank=body["rank_offset"],
                world_size=body["world_size"],
                backend=body["backend"],
                device=CPU,
                timeout_s=body["timeout_s"],
            )
            self.receiver = WeightReceiver(group)
            return {"group": body["group"]}

        @app.post("/weights/update")
        def update(body: dict) -> dict:
            if refuse_updates:
                raise HTTPException(409, "not now")
            assert self.receiver is not None
            nbytes = self.receiver.receive(
                body["params"],
                body["bucket_bytes"],
                lambda batch: self.weights.update(batch),
                update_id=body["update_id"],
            )
            self.version = body["version"]
            return {"policy_version": self.version, "bytes": nbytes}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))

    @contextmanager
    def running(self):
        thread = threading.Thread(target=self.server.run, daemon=True)
        thread.start()
        while not self.server.started:
            time.sleep(0.01)
        try:
            yield self
        finally:
            self.server.should_exit = True
            thread.join(10)


def test_a_port_held_by_something_else_is_named_not_waited_on():
    # TCPStore's client waits forever on a listener that never answers.
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        addr = f"127.0.0.1:{stranger.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="KUBEFORGE_WEIGHT_SYNC_ADDR.*another program holds that port"):
            weight_sync.latest_version(addr, timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_connect_and_send_drive_every_generator_through_http():
    named = named_tensors()
    addr = f"127.0.0.1:{free_port()}"
    assert weight_sync.latest_version(addr, timeout_s=1) is None  # no trainer yet
    with FakeGenerator().running() as first, FakeGenerator().running() as second:
        sender = WeightSender(addr, bucket_bytes=3000, backend="gloo", token="tok", timeout_s=30)
        assert sender.connect([first.url, second.url]) == 3
        assert weight_sync.latest_version(addr) is None  # nothing sent yet: a new generator serves its disk weights
        stats = sender.send(named, version=4)
        # A generator that comes back: the group is formed anew, the next version reaches both.
        assert sender.connect([first.url, second.url]) == 3
        again = sender.send(named, version=5)
        assert weight_sync.latest_version(addr) == 5  # what a (re)starting generator waits for
        sender.close()

    assert stats.version == 4 and stats.buckets == 3
    assert stats.generators == [{"policy_version": 4, "bytes": stats.bytes}] * 2
    assert [g["policy_version"] for g in again.generators] == [5, 5]
    for generator in (first, second):
        assert generator.version == 5
        assert all(torch.equal(generator.weights[n], t) for n, t in named)


def test_a_refused_update_fails_fast_instead_of_hanging_in_the_broadcast():
    with FakeGenerator(refuse_updates=True).running() as generator:
        sender = WeightSender(f"127.0.0.1:{free_port()}", backend="gloo", token="tok", timeout_s=60)
        sender.connect([generator.url])
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="409"):
            sender.send(named_tensors(), version=1)
        assert time.monotonic() - started < 10
        sender.close()
