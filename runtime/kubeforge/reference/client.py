"""The reference role's wire form and the controller's client of it.

POST /logprobs takes a batch in its wire form (kubeforge.batch) and answers a safetensors body
with one tensor, `ref_logprobs` [B, T] float32, aligned with the batch's `input_ids` (position 0
and everything outside the response hold 0), as the batch itself carries them. This module
imports no model code: the controller uses `ReferenceClient`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import httpx
import torch
from safetensors.torch import load, save

from kubeforge.batch import CONTENT_TYPE as BATCH_CONTENT_TYPE
from kubeforge.batch import TrainBatch

CONTENT_TYPE = "application/vnd.kubeforge.logprobs+safetensors"
TENSOR = "ref_logprobs"


def encode_logprobs(logprobs: torch.Tensor) -> bytes:
    return save({TENSOR: logprobs.to(torch.float32).contiguous()})


def decode_logprobs(body: bytes) -> torch.Tensor:
    return load(body)[TENSOR]


class ReferenceError(RuntimeError):
    """A reference replica refused or failed a batch; the message carries its answer."""


class ReferenceClient:
    """Async client of the reference replicas (base URLs); requests take the replicas in turn."""

    def __init__(self, urls: Sequence[str], *, token: str = "", timeout: float = 600.0):
        if not urls:
            raise ValueError("no reference replicas: the job needs spec.roles.reference.enabled (and not colocate)")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._urls = itertools.cycle([u.rstrip("/") for u in urls])
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers)

    async def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] log-probabilities of the batch's tokens under the reference model."""
        url = next(self._urls)
        reply = await self._http.post(
            f"{url}/logprobs", content=batch.encode(), headers={"Content-Type": BATCH_CONTENT_TYPE}
        )
        if reply.status_code != 200:
            raise ReferenceError(f"{url}/logprobs: HTTP {reply.status_code} {reply.text[:500]}")
        return decode_logprobs(reply.content)

    async def fill(self, batch: TrainBatch) -> TrainBatch:
        """`batch` with its `ref_logprobs` set, ready for the trainer's KL penalty."""
        batch.ref_logprobs = await self.logprobs(batch)
        return batch

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ReferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
