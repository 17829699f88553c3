"""The bucket plan: the wire format, cut identically on both sides.

Parameters travel in the generator's (HF) names, dtypes and shapes, packed into flat byte
buckets of a configurable size. Sender and receivers cut the buckets with `plan_buckets` from the
same parameter list, so only the list (JSON, over HTTP) and the bytes (broadcast) cross the wire.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 << 20
# Every tensor starts at a multiple of this many bytes inside its bucket, so that a byte view
# can be reinterpreted as any dtype (the widest, complex128, needs 16).
ALIGN_BYTES = 16


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
