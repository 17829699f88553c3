"""B1 (transport only): the weight-sync protocol against a raw broadcast, on one machine, same run.

Sends synthetic weights from rank 0 to N local receivers with the runtime's own weight-sync code
(`WeightSender.broadcast`: bucket plan, packing into a preallocated flat buffer, broadcast;
`WeightReceiver`: receive and unpack), checks every byte, prints the bandwidth, then times a raw
broadcast of the same bytes in one piece on the same process group. The trainer's FSDP gather
and vLLM's load are not in it (weight_sync_bench.py measures them).

    python bench/weight_sync_check.py --receivers N --mb M --bucket-mb B [--backend gloo|nccl]
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from kubeforge.weight_sync import (  # noqa: E402
    ParamSpec,
    SyncGroup,
    WeightReceiver,
    WeightSender,
    join_group,
    open_store,
    plan_buckets,
    plan_digest,
)


def _check_rank(
    rank: int, world_size: int, addr: str, backend: str, params: list[ParamSpec], args: argparse.Namespace
) -> None:
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
        raw = [raw_broadcast(sender.group, total) for _ in range(args.rounds + 1)][1:]
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
        raw_broadcast(receiver.group, total)
    if wrong:
        raise SystemExit(f"rank {rank}: wrong values in {wrong[:5]}")
    print(f"rank {rank}: every parameter arrived intact, {args.rounds + 1} rounds", flush=True)


def raw_broadcast(group: SyncGroup, nbytes: int) -> float:
    """The baseline: one broadcast of `nbytes` from a preallocated buffer, no protocol; seconds."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=group.device)
    start = time.perf_counter()
    group.broadcast(buffer)
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/weight_sync_check.py",
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
