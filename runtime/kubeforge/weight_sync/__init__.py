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

The parts, after vLLM's split of a control-plane client from the data plane:

- plan.py: the bucket plan (`ParamSpec`, `plan_buckets`, `PlanMemo`), identical on both sides;
- group.py: the standalone process group and its rendezvous store (`join_group`, `open_store`,
  `latest_version`);
- receiver.py: the generator worker's side (`WeightReceiver`);
- sender.py: the trainer's data plane (`WeightSender`: the ready handshake, packing, broadcast);
- control.py: the control plane, a small `ControlPlane` protocol and its HTTP client.

bench/weight_sync_check.py checks the transport on one machine and measures it.

This package must not import vLLM: the trainer imports it.
"""

from kubeforge.weight_sync.control import ControlPlane, HttpControlPlane
from kubeforge.weight_sync.group import (
    DEFAULT_TIMEOUT_S,
    LATEST_VERSION_KEY,
    STORE_PREFIX,
    SyncGroup,
    default_backend,
    join_group,
    latest_version,
    open_store,
    parse_addr,
)
from kubeforge.weight_sync.plan import (
    ALIGN_BYTES,
    DEFAULT_BUCKET_BYTES,
    Bucket,
    BucketEntry,
    ParamSpec,
    PlanMemo,
    dtype_name,
    max_bucket_bytes,
    plan_buckets,
    plan_digest,
    views,
)
from kubeforge.weight_sync.receiver import WeightReceiver
from kubeforge.weight_sync.sender import SendStats, WeightSender, gather_only

__all__ = [
    "ALIGN_BYTES",
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT_S",
    "LATEST_VERSION_KEY",
    "STORE_PREFIX",
    "Bucket",
    "BucketEntry",
    "ControlPlane",
    "HttpControlPlane",
    "ParamSpec",
    "PlanMemo",
    "SendStats",
    "SyncGroup",
    "WeightReceiver",
    "WeightSender",
    "default_backend",
    "dtype_name",
    "gather_only",
    "join_group",
    "latest_version",
    "max_bucket_bytes",
    "open_store",
    "parse_addr",
    "plan_buckets",
    "plan_digest",
    "views",
]
