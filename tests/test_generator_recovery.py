"""How a generator replica recovers, no engine needed (issue 16, items 1 and 7): a replica whose
weight update stopped half-way exits as a transient failure, so the failure policy restarts it; a
replica that starts mid-job holds out only for a policy version the trainer confirms (the
weight-sync store is reachable by every pod of the job, so its "latest version" key alone never
decides)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from kubeforge import auth, serving, weight_sync
from kubeforge.auth import Credentials
from kubeforge.contract import RoleContext
from kubeforge.generator import role as generator_role
from kubeforge.generator.role import hold_for_current_weights, version_to_wait_for
from kubeforge.generator.service import Generator
from kubeforge.launcher import allocate_ports
from kubeforge.serving import RoleServer
from kubeforge.spec import RLJobSpec

TOKENS = auth.new_tokens()


@pytest.mark.parametrize(
    ("stored", "confirmed", "wanted"),
    [
        (None, 5, None),  # nothing sent yet: the weights on disk are current
        (0, 5, None),
        (5, 5, 5),  # the usual restart: wait for what the trainer sent
        (4, 5, 4),  # trained since the last publish: the next publish brings 5
        (10**9, 5, 5),  # a forged key: the trainer's word wins
        (10**9, 0, None),  # forged, and the trainer never trained: serve from disk
        (5, None, None),  # the trainer did not answer: never wait on an unconfirmed version
    ],
)
def test_a_replica_waits_only_for_a_version_the_trainer_confirms(stored, confirmed, wanted):
    assert version_to_wait_for(stored, confirmed) == wanted


class _Trainer(BaseHTTPRequestHandler):
    policy_version = 3
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"policy_version": self.policy_version, "weights": []}).encode()
        self.send_response(200 if self.path == "/weights/names" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_forged_latest_version_does_not_hold_a_restarted_replica_forever(tmp_path: Path):
    (store_port,) = allocate_ports(["store"], None).values()
    store = weight_sync.open_store(f"127.0.0.1:{store_port}", is_master=True, timeout_s=10)
    store.set(weight_sync.LATEST_VERSION_KEY, str(10**9))  # what any pod of the job could write
    trainer = HTTPServer(("127.0.0.1", 0), _Trainer)
    threading.Thread(target=trainer.serve_forever, daemon=True).start()
    try:
        ctx = RoleContext(
            job="demo", namespace="team", role="generator", replica=1,
            spec=RLJobSpec.model_validate({"model": {"path": "/m"}}), run_dir=tmp_path,
            credentials=Credentials.issue("generator", TOKENS), http_host="127.0.0.1", http_port=1,
            weight_sync_addr=f"127.0.0.1:{store_port}",
            peers={"trainer": [f"http://127.0.0.1:{trainer.server_port}"]},
        )  # fmt: skip
        server = RoleServer(ctx)
        generator = Generator(server, engine=None, engine_args=None)
        assert asyncio.run(hold_for_current_weights(generator)) is True
        assert generator.serve_from_version == 3  # the trainer's version, not the store's
        assert _Trainer.seen == [f"Bearer {TOKENS['job']}"]
        generator._set_version(3)  # the trainer's publish arrives
        assert server.ready
    finally:
        trainer.shutdown()
        del store


class _Engine:
    """Stands in for vLLM's AsyncLLM (none can start in a unit test): only what the role watches."""

    errored = False


def _generator(tmp_path: Path, termination_log: str = "") -> Generator:
    ctx = RoleContext(
        job="demo", namespace="team", role="generator", replica=0,
        spec=RLJobSpec.model_validate({"model": {"path": "/m"}}), run_dir=tmp_path,
        credentials=Credentials.issue("generator", TOKENS), http_host="127.0.0.1", http_port=0,
        weight_sync_addr="", termination_log=termination_log,
    )  # fmt: skip
    return Generator(RoleServer(ctx), engine=_Engine(), engine_args=None)


def test_a_replica_whose_weight_update_broke_exits_for_a_restart(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(generator_role, "ENGINE_CHECK_INTERVAL_S", 0.01)
    log = tmp_path / "termination.json"
    generator = _generator(tmp_path, str(log))
    generator.broken = "weight update to v3 failed: RuntimeError: Connection reset by peer"
    generator.server.ctx.http_port = allocate_ports(["http"], None)["http"]

    code = asyncio.run(serving.run_role(generator.server, lambda: generator_role.watch(generator)))
    assert code == 75  # contract.EXIT_TRANSIENT
    words = json.loads(log.read_text())
    assert words["transient"] is True and "weight update to v3 failed" in words["error"]


def test_an_engine_that_died_on_its_own_is_a_plain_error(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(generator_role, "ENGINE_CHECK_INTERVAL_S", 0.01)
    generator = _generator(tmp_path)
    generator.engine.errored = True
    with pytest.raises(RuntimeError, match="the vLLM engine stopped") as raised:
        asyncio.run(generator_role.watch(generator))
    assert not isinstance(raised.value, serving.TransientFailure)
