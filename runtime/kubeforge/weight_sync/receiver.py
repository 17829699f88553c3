"""The receiver: what a generator worker runs (vLLM's worker-side engine, generator/transfer.py, wraps it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from kubeforge.weight_sync.group import SyncGroup
from kubeforge.weight_sync.plan import Bucket, ParamSpec, PlanMemo, views


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
