"""The controller's client of the trainer role's HTTP API (global rank 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from kubeforge.batch import CONTENT_TYPE, TrainBatch

CONNECT_S = 10.0  # the trainer's port answers at once when the trainer is up


class TrainerError(RuntimeError):
    """The trainer refused or failed a request; the message carries its answer."""


class TrainerClient:
    def __init__(self, url: str, *, token: str = "", timeout: float | None = 3600.0):
        """`timeout`: the longest one call may take (spec.stepDeadlineSeconds; None: no limit)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=CONNECT_S), headers=headers
        )

    async def train(self, batch: TrainBatch) -> dict[str, Any]:
        """One optimizer step on `batch`; the step's metrics."""
        return await self._post("/train", content=batch.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def evaluate(self, batch: TrainBatch) -> dict[str, Any]:
        """`batch`'s loss under the current weights, with no update: {loss, tokens, samples, policy_version}."""
        return await self._post("/evaluate", content=batch.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def export(self, directory: str | None = None) -> dict[str, Any]:
        """The current weights as an HF checkpoint (default RUN_DIR/exports/policy-vN): {path, policy_version}."""
        return await self._post("/weights/export", json={"dir": directory} if directory else {})

    async def publish(self, generators: Sequence[str] | None = None, *, reconnect: bool = False) -> dict[str, Any]:
        """Send the current weights to `generators` (default: every replica of the job)."""
        body: dict[str, Any] = {"reconnect": reconnect}
        if generators is not None:
            body["generators"] = list(generators)
        return await self._post("/weights/publish", json=body)

    async def checkpoint(self, app_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """A DCP checkpoint now, with the controller's `app_state` saved beside it."""
        return await self._post("/checkpoint", json={"app_state": app_state})

    async def status(self) -> dict[str, Any]:
        """step, policy_version, checkpoint, and the app_state of the checkpoint it resumed from."""
        reply = await self._call("GET", "/status")
        self._check(reply)
        return reply.json()

    async def close(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        reply = await self._call("POST", path, **kwargs)
        self._check(reply)
        return reply.json()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            if isinstance(e, httpx.ConnectTimeout):
                raise
            raise TrainerError(
                f"trainer {path}: no answer within {self.timeout:.0f} s (spec.stepDeadlineSeconds); the step, "
                "save or sync is still running there: raise the deadline if it is only slow"
            ) from e

    @staticmethod
    def _check(reply: httpx.Response) -> None:
        if reply.status_code != 200:
            raise TrainerError(f"trainer {reply.request.url.path}: HTTP {reply.status_code} {reply.text[:500]}")
