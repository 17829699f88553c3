"""The control plane: how the trainer asks the generators to join the group and to take an update.

vLLM splits its RL weight transfer the same way: a control-plane client (HTTP requests that tell
the engine to init the transfer and to update) and a data plane (the collective that moves the
bytes). The sender (sender.py) speaks to the generators only through the small `ControlPlane`
protocol below; `HttpControlPlane` is the client it uses, on the generators' weight routes:

    GET  /weights/info     how many receiving workers (ranks) a generator has
    POST /weights/init     join the group formed at the trainer's store (blocks until rank 0 joins)
    POST /weights/update   receive one update (answers after the broadcast, once loaded)

Both POSTs are answered only after a collective that rank 0 drives meanwhile, so they are sent
alongside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeVar

from kubeforge.weight_sync.group import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")


class ControlPlane(Protocol):
    """The operations the sender asks of the generators, besides the bytes themselves."""

    def workers(self, urls: Sequence[str]) -> list[int]:
        """How many receiving workers (ranks of the group) each generator at `urls` has."""
        ...

    def init(self, urls: Sequence[str], bodies: Sequence[dict], join: Callable[[], object]) -> None:
        """Ask generator `urls[i]` to join the group as `bodies[i]` says, while `join` joins it here."""
        ...

    def update(
        self, urls: Sequence[str], body: dict, transfer: Callable[[Sequence[Future]], T]
    ) -> tuple[T, list[dict]]:
        """Announce update `body` to every generator while `transfer` sends it here; return what
        `transfer` returned and each generator's answer. `transfer` gets the pending answers, so
        that it can fail fast on a refusal."""
        ...


class HttpControlPlane:
    """`ControlPlane` over the generators' HTTP weight routes, presenting the trainer's `token`."""

    def __init__(self, *, token: str = "", timeout_s: float = DEFAULT_TIMEOUT_S):
        self.token = token
        self.timeout_s = timeout_s

    def workers(self, urls: Sequence[str]) -> list[int]:
        import httpx

        with httpx.Client(timeout=30, headers=self.headers()) as http:
            return [int(_check(http.get(f"{u}/weights/info")).json()["workers"]) for u in urls]

    def init(self, urls: Sequence[str], bodies: Sequence[dict], join: Callable[[], object]) -> None:
        requests = [(f"{u}/weights/init", body) for u, body in zip(urls, bodies, strict=True)]
        self._alongside(requests, lambda _futures: join())

    def update(
        self, urls: Sequence[str], body: dict, transfer: Callable[[Sequence[Future]], T]
    ) -> tuple[T, list[dict]]:
        return self._alongside([(f"{u}/weights/update", body) for u in urls], transfer)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _post(self, url: str, body: dict) -> dict:
        import httpx

        with httpx.Client(timeout=self.timeout_s + 30, headers=self.headers()) as http:
            return _check(http.post(url, json=body)).json()

    def _alongside(
        self, requests: Sequence[tuple[str, dict]], action: Callable[[Sequence[Future]], T]
    ) -> tuple[T, list[dict]]:
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


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        request = response.request
        raise RuntimeError(f"{request.method} {request.url}: {response.status_code} {response.text}")
    return response
