"""The /generate wire format and a small async client for it.

A /generate answer is one safetensors body (never JSON lists of numbers):

| tensor      | dtype   | shape          | holds                                                    |
|-------------|---------|----------------|----------------------------------------------------------|
| `token_ids` | int32   | [total tokens] | every sample's sampled tokens, back to back              |
| `logprobs`  | float32 | [total tokens] | the log-probability of each sampled token                |
| `offsets`   | int64   | [samples + 1]  | sample i is `token_ids[offsets[i]:offsets[i+1]]`         |

and safetensors metadata (string -> string), each value JSON:

| key               | value                                                                          |
|-------------------|--------------------------------------------------------------------------------|
| `policy_version`  | int: the oldest policy version that sampled any token of this answer            |
| `policy_versions` | per sample [first, last]: the versions that sampled its first and last tokens   |
| `finish_reasons`  | per sample "stop" or "length" ("abort" if the engine dropped it)                |
| `prompt_index`    | per sample, the index of its prompt in the request (samples come grouped by prompt, n each) |

Samples of one prompt are contiguous, prompts in request order. A sample's versions differ
only when a weight update landed while it was being generated (vLLM's in-flight update).
This module imports neither vLLM nor FastAPI: the controller uses `GeneratorClient`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

CONTENT_TYPE = "application/vnd.kubeforge.generation+safetensors"


@dataclass
class Generation:
    """A decoded /generate answer."""

    token_ids: torch.Tensor  # int32 [total tokens]
    logprobs: torch.Tensor  # float32 [total tokens]
    offsets: torch.Tensor  # int64 [samples + 1]
    prompt_index: list[int]
    finish_reasons: list[str]
    policy_version: int
    policy_versions: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_index)

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, logprobs) of sample i, as views."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.token_ids[start:end], self.logprobs[start:end]

    def samples(self) -> list[tuple[list[int], list[float]]]:
        """Every sample as Python lists (for small answers and tests)."""
        return [(ids.tolist(), lps.tolist()) for ids, lps in map(self.sample, range(len(self)))]


def encode(
    samples: Sequence[tuple[Sequence[int], Sequence[float]]],
    *,
    prompt_index: Sequence[int],
    finish_reasons: Sequence[str],
    policy_versions: Sequence[Sequence[int]],
) -> bytes:
    """The safetensors body of a /generate answer."""
    lengths = [len(ids) for ids, _ in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    if lengths:
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    token_ids = torch.tensor([t for ids, _ in samples for t in ids], dtype=torch.int32)
    logprobs = torch.tensor([lp for _, lps in samples for lp in lps], dtype=torch.float32)
    oldest = min((v[0] for v in policy_versions), default=0)
    metadata = {
        "policy_version": json.dumps(int(oldest)),
        "policy_versions": json.dumps([[int(a), int(b)] for a, b in policy_versions]),
        "finish_reasons": json.dumps(list(finish_reasons)),
        "prompt_index": json.dumps([int(i) for i in prompt_index]),
    }
    return st_save({"token_ids": token_ids, "logprobs": logprobs, "offsets": offsets}, metadata=metadata)


def decode(body: bytes) -> Generation:
    """Parse a /generate answer."""
    tensors = st_load(body)
    metadata = _metadata(body)
    return Generation(
        token_ids=tensors["token_ids"],
        logprobs=tensors["logprobs"],
        offsets=tensors["offsets"],
        prompt_index=json.loads(metadata["prompt_index"]),
        finish_reasons=json.loads(metadata["finish_reasons"]),
        policy_version=json.loads(metadata["policy_version"]),
        policy_versions=json.loads(metadata["policy_versions"]),
    )


def _metadata(body: bytes) -> dict[str, str]:
    # safetensors.torch.load drops the metadata; the header is 8 bytes of length, then JSON.
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + size]).get("__metadata__", {})


class GeneratorError(RuntimeError):
    """A replica answered with an error; `status` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class GeneratorClient:
    """Async client of one generator replica (its base URL, e.g. http://127.0.0.1:8100)."""

    def __init__(self, base_url: str, *, timeout: float = 600.0, token: str = ""):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers)

    async def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        **extra: Any,
    ) -> Generation:
        """n samples for each prompt, with per-token logprobs and policy versions."""
        body = {
            "prompt_token_ids": [list(map(int, p)) for p in prompt_token_ids],
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop_token_ids": None if stop_token_ids is None else list(stop_token_ids),
            **extra,
        }
        response = await self._http.post("/generate", json=body)
        return decode(self._check(response).content)

    async def weights_info(self) -> dict[str, Any]:
        """{"policy_version", "workers", ...}: what the trainer needs to plan a weight sync."""
        return self._check(await self._http.get("/weights/info")).json()

    async def policy_version(self) -> int:
        return int((await self.weights_info())["policy_version"])

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> GeneratorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise GeneratorError(
                f"{response.request.url.path}: {response.status_code} {response.text[:500]}", response.status_code
            )
        return response
