"""The job's generator replicas seen as one policy, kept in step with the trainer through failures.

A replica that stops answering (killed, restarting) is left out: its share of a request goes to
the replicas that remain, or waits for one to come back when none does. A replica that comes
back starts from the weights on disk and serves nothing until the trainer has sent it the
current ones (kubeforge.generator.role.hold_for_current_weights); `publish` re-forms the
weight-sync group whenever the set of live replicas changed or one of them holds an older
policy version than the last publish sent (a replica that came back at the same address), so
the returning replica gets them first.

The set of replicas follows the spec: given a function of the job's current generator URLs
(`Job.urls`, which reads the peers file the operator rewrites on a spec edit), the pool takes in a
replica the spec added, which then gets the weights like a returning one, and drops one the spec
removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from kubeforge.generator.wire import Generation, GeneratorClient, GeneratorError
from kubeforge.trainer.client import TrainerClient, TrainerError

log = logging.getLogger("kubeforge.controller")

POLL_SECONDS = 1.0


class NoGenerators(RuntimeError):
    """No replica answered within the wait: the job cannot go on."""


class GeneratorPool:
    def __init__(
        self,
        urls: Sequence[str] | Callable[[], Sequence[str]],
        trainer: TrainerClient,
        *,
        token: str = "",
        wait_seconds: float = 900.0,
    ):
        self._membership = urls if callable(urls) else (lambda fixed=list(urls): fixed)
        self._token = token
        self.clients: dict[str, GeneratorClient] = {}
        self._retired: dict[str, GeneratorClient] = {}
        self._follow_membership()
        if not self.clients:
            raise ValueError("no generator replicas: the job needs spec.roles.generator.replicas >= 1")
        self.trainer = trainer
        self.wait_seconds = wait_seconds
        self.synced: list[str] = []  # the replicas the last publish reached, in the group's order
        self.synced_version: int | None = None  # the policy version it sent them
        self.failovers = 0  # shares re-sent to another replica after a failure
        self._sync_lock = asyncio.Lock()

    # -- weights ------------------------------------------------------------------------------

    async def publish(self) -> dict[str, Any]:
        """Send the trainer's current weights to every live replica; the trainer's answer.

        Waits for at least one replica. If a replica dies during the copy, the trainer's
        publish fails; the live set is read again and the weights sent again.
        """
        async with self._sync_lock:
            deadline = time.monotonic() + self.wait_seconds
            while True:
                live = await self.live(wait=True)
                try:
                    result = await self.trainer.publish(live, reconnect=live != self.synced)
                    self.synced, self.synced_version = live, result["policy_version"]
                    return result
                except (TrainerError, httpx.TransportError) as e:
                    self.synced = []
                    if time.monotonic() > deadline:
                        raise
                    log.warning("weight sync to %s failed (%s); retrying with the replicas still alive", live, e)
                    await asyncio.sleep(POLL_SECONDS)

    async def live(self, *, wait: bool = False) -> list[str]:
        """Replicas whose weight routes answer (in URL order); with `wait`, at least one."""
        return list(await self._live_infos(wait=wait))

    def _follow_membership(self) -> None:
        """Take in the replicas the spec asks for now and drop the others. An empty set (a peers file
        being rewritten) changes nothing: the spec never asks for none."""
        wanted = [u.rstrip("/") for u in self._membership()]
        if not wanted or wanted == list(self.clients):
            return
        if self.clients:
            log.info("generator replicas now: %s (the spec changed)", ", ".join(wanted))
        # A dropped replica's client may still carry a request in flight: it is closed with the pool.
        self._retired.update({u: c for u, c in self.clients.items() if u not in wanted})
        # In the spec's order, which is the weight-sync group's rank order.
        self.clients = {u: self.clients.get(u) or GeneratorClient(u, token=self._token) for u in wanted}

    async def _live_infos(self, *, wait: bool) -> dict[str, dict[str, Any]]:
        """`live`'s replicas, each with its /weights/info answer."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            self._follow_membership()
            answers = await asyncio.gather(*(self._info(c) for c in self.clients.values()))
            live = {url: info for url, info in zip(self.clients, answers, strict=True) if info is not None}
            if live or not wait:
                return live
            if time.monotonic() > deadline:
                raise NoGenerators(f"no generator answered for {self.wait_seconds:.0f} s: {', '.join(self.clients)}")
            await asyncio.sleep(POLL_SECONDS)

    @staticmethod
    async def _info(client: GeneratorClient) -> dict[str, Any] | None:
        try:
            info = await client.weights_info()
        except (httpx.HTTPError, GeneratorError):  # down, or up but its engine still starting (404)
            return None
        return None if info.get("broken") else info

    # -- generation ---------------------------------------------------------------------------

    async def generate(
        self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float, seed: int
    ) -> list[tuple[int, Generation]]:
        """`n` samples of each prompt: (index of the share's first prompt, its Generation) per share.

        Prompt i is always sampled with seed `seed + i`, on whichever replica serves it.
        """
        live = await self._current()
        share = -(-len(prompts) // len(live))  # ceil: one contiguous share per live replica
        starts = list(range(0, len(prompts), share))

        async def one(k: int, start: int) -> tuple[int, Generation]:
            chunk = prompts[start : start + share]
            url = live[k]
            deadline = time.monotonic() + self.wait_seconds
            while True:
                try:
                    client = self.clients.get(url) or self._retired[url]  # dropped since: finish here or fail over
                    generation = await client.generate(
                        chunk, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed + start
                    )
                    return start, generation
                except (httpx.TransportError, GeneratorError) as e:
                    if isinstance(e, GeneratorError) and e.status < 500:
                        raise  # the request itself is wrong: another replica would refuse it too
                    if time.monotonic() > deadline:
                        raise
                    self.failovers += 1
                    replicas = await self._current()
                    next_url = replicas[(replicas.index(url) + 1) % len(replicas)] if url in replicas else replicas[0]
                    log.warning("generator %s failed (%s); its %d prompts go to %s", url, e, len(chunk), next_url)
                    url = next_url

        return await asyncio.gather(*(one(k, s) for k, s in enumerate(starts)))

    async def _current(self) -> list[str]:
        """The live replicas, after sending the weights to any that (re)joined since the last publish."""
        live = await self._live_infos(wait=True)
        # Behind, not merely different: a replica may already hold the version a publish in
        # flight is sending, before that publish returns.
        sent = self.synced_version or 0
        behind = any(info.get("policy_version", 0) < sent for info in live.values())
        if list(live) != self.synced or behind:
            await self.publish()
            return self.synced
        return list(live)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in [*self.clients.values(), *self._retired.values()]))
