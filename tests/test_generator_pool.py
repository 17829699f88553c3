"""The controller's generator pool follows the spec's replicas (issue 16, item 13): a replica a spec
edit adds gets the weights and a share of the prompts, one it removes gets neither; and the peers
file the operator rewrites is what `RoleContext.current_peers` reads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from kubeforge.auth import Credentials
from kubeforge.contract import RoleContext
from kubeforge.controller import generators
from kubeforge.controller.generators import GeneratorPool
from kubeforge.validation import parse_job


class FakeGenerator:
    """A replica that is always up: it serves the version last published to it."""

    replicas: dict[str, FakeGenerator] = {}

    def __init__(self, url: str, token: str = "") -> None:
        self.url, self.version, self.prompts, self.closed = url, 0, 0, False
        FakeGenerator.replicas[url] = self

    async def weights_info(self) -> dict[str, Any]:
        return {"policy_version": self.version, "workers": 1}

    async def generate(self, chunk: list[list[int]], **_: Any) -> str:
        self.prompts += len(chunk)
        return self.url

    async def close(self) -> None:
        self.closed = True


class FakeTrainer:
    def __init__(self) -> None:
        self.version, self.publishes = 1, []

    async def publish(self, urls: list[str], *, reconnect: bool = False) -> dict[str, Any]:
        self.publishes.append((list(urls), reconnect))
        for url in urls:
            FakeGenerator.replicas[url].version = self.version
        return {"policy_version": self.version}


# (case, replicas before, replicas after the edit)
EDITS = [
    ("scaled up", ["http://g0"], ["http://g0", "http://g1"]),
    ("scaled down", ["http://g0", "http://g1", "http://g2"], ["http://g0"]),
    ("one replaced", ["http://g0", "http://g1"], ["http://g0", "http://g2"]),
    ("unchanged", ["http://g0", "http://g1"], ["http://g0", "http://g1"]),
]


@pytest.mark.parametrize(("case", "before", "after"), EDITS, ids=[e[0] for e in EDITS])
def test_the_pool_follows_the_replicas_the_spec_asks_for(
    monkeypatch: pytest.MonkeyPatch, case: str, before: list[str], after: list[str]
) -> None:
    monkeypatch.setattr(generators, "GeneratorClient", FakeGenerator)
    FakeGenerator.replicas = {}
    current = list(before)
    trainer = FakeTrainer()
    pool = GeneratorPool(lambda: current, trainer)  # type: ignore[arg-type]

    async def step() -> list[str]:
        shares = await pool.generate([[1]] * 12, n=1, max_tokens=1, temperature=1.0, seed=0)
        return sorted({url for _, url in shares})

    async def run() -> None:
        await pool.publish()
        assert await step() == before
        current[:] = after
        trainer.version += 1
        await pool.publish()
        served = await step()
        await pool.close()
        assert served == sorted(after)
        # The last publish re-formed the group with exactly the new set (a new or a gone replica: reconnect).
        assert trainer.publishes[-1] == (after, after != before)
        assert all(FakeGenerator.replicas[u].version == trainer.version for u in after)
        gone = set(before) - set(after)
        assert all(FakeGenerator.replicas[u].closed for u in FakeGenerator.replicas), "closed with the pool"
        assert not gone & set(pool.clients)

    asyncio.run(run())


def test_an_empty_or_unreadable_peers_file_keeps_the_replicas_of_the_environment(
    minimal_job: dict[str, Any], tmp_path: Path
) -> None:
    peers = tmp_path / "peers.json"
    ctx = RoleContext(
        job="demo", namespace="team", role="controller", replica=0, spec=parse_job(minimal_job).spec,
        run_dir=tmp_path, credentials=Credentials.issue("controller"), http_host="127.0.0.1", http_port=0,
        weight_sync_addr="", peers={"generator": ["http://g0"]}, peers_file=str(peers),
    )  # fmt: skip
    assert ctx.current_peers("generator") == ["http://g0"]  # not written yet
    peers.write_text("{not json")
    assert ctx.current_peers("generator") == ["http://g0"]
    peers.write_text(json.dumps({"generator": ["http://g0", "http://g1"], "reward": ["http://r0"]}))
    assert ctx.current_peers("generator") == ["http://g0", "http://g1"]
    assert ctx.current_peers("reference") == []  # the spec asks for none now
