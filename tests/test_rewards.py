"""Reward functions on hand-written cases, batch scoring (threads, budget), the reward role over real
HTTP, and the client's retries against fake replicas."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kubeforge import auth
from kubeforge.algorithm import Algorithm
from kubeforge.rewards import REGISTRY, RewardClient, RewardError, register
from kubeforge.rewards.client import ANSWER_MARGIN_S
from kubeforge.rewards.functions import WeightedReward, correctness, exact, format_reward, from_algorithm
from kubeforge.rewards.scoring import DEFAULT_BUDGET_S, OUT_OF_BUDGET, score


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("abc", 1.0),
        (" abc\n", 1.0),  # surrounding whitespace is not the model's answer
        ("abx", 2 / 3),
        ("ab", 2 / 3),  # too short
        ("abcde", 3 / 5),  # running on costs as much as a wrong character
        ("cba", 1 / 3),
        ("", 0.0),
        ("@#!", 0.0),
    ],
)
def test_correctness_gives_partial_credit_by_position(completion, expected):
    assert correctness("abc", completion, "abc") == pytest.approx(expected)


def test_correctness_of_an_empty_answer_is_zero():
    assert correctness("", "abc", "") == 0.0


def test_exact_is_all_or_nothing():
    assert exact("abc", "abc ", "abc") == 1.0
    assert exact("abc", "abd", "abc") == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [("cab", 1.0), ("ca#", 2 / 3), ("", 0.0), ("   ", 0.0), ("XYZ", 0.0), ("a\x00b", 2 / 3)],
)
def test_format_counts_characters_of_the_task_alphabet(completion, expected):
    assert format_reward("abc", completion, "abc") == pytest.approx(expected)


def test_score_weights_components():
    rewards = from_algorithm(
        Algorithm.model_validate(
            {"rewards": [{"name": "correctness", "weight": 1.0}, {"name": "format", "weight": 0.5}]}
        )
    )
    out = score(
        rewards,
        [{"prompt": "ab", "completion": "ab", "answer": "ab"}, {"prompt": "ab", "completion": "bz", "answer": "ab"}],
    )
    assert out["components"] == {"correctness": [1.0, 0.0], "format": [1.0, 0.5]}
    assert out["rewards"] == pytest.approx([1.5, 0.25])
    assert out["reasons"] == [None, None]


def _sleepy(seconds: float) -> list[WeightedReward]:
    def slow(prompt: str, completion: str, answer: str) -> float:
        time.sleep(seconds)
        return 1.0

    return [WeightedReward("slow", 2.0, slow)]


def test_threads_score_slow_items_at_once():
    started = time.monotonic()
    out = score(_sleepy(0.3), [{"prompt": "", "completion": ""}] * 4, threads=4)
    assert out["rewards"] == [2.0] * 4 and out["components"] == {"slow": [1.0] * 4}
    assert time.monotonic() - started < 0.9  # one after another: 1.2 s


def test_the_budget_ends_a_batch_with_the_rest_scored_zero_and_a_reason():
    started = time.monotonic()
    out = score(_sleepy(0.3), [{"prompt": "", "completion": ""}] * 10, threads=2, deadline=started + 0.5)
    assert time.monotonic() - started < 0.7  # not the 1.5 s that 10 x 0.3 s on 2 threads take
    # 0.0-0.3 s: items 0 and 1; 0.3-0.6 s: items 2 and 3, cut off at 0.5 s; 4-9 never started
    assert out["rewards"] == [2.0, 2.0] + [0.0] * 8 and out["components"] == {"slow": [1.0, 1.0] + [0.0] * 8}
    assert out["reasons"] == [None, None] + [OUT_OF_BUDGET] * 8


def test_a_raising_function_fails_the_batch_it_is_in():
    def explodes(prompt: str, completion: str, answer: str) -> float:
        raise ZeroDivisionError("no reward for you")

    with pytest.raises(ZeroDivisionError, match="no reward for you"):
        score([WeightedReward("explodes", 1.0, explodes)], [{"prompt": "", "completion": ""}] * 3, threads=2)


def test_unknown_reward_name_is_refused_with_the_field():
    with pytest.raises(ValueError, match=r"spec.algorithm.rewards\[0\].name: got 'corectness'; expected one of"):
        from_algorithm(Algorithm.model_validate({"rewards": [{"name": "corectness"}]}))


def test_default_is_correctness_alone():
    assert [r.name for r in from_algorithm(Algorithm())] == ["correctness"]


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register("correctness")(lambda p, c, a: 0.0)


# -- the role over HTTP ----------------------------------------------------------------------------

# A plugin module that the role process imports first: it registers a reward function that raises
# and one that takes 0.4 s per item.
TOKENS = auth.new_tokens()
JOB_AUTH = auth.bearer(TOKENS["job"])  # what the controller presents to a reward replica

RAISING_MODULE = """
import time
from kubeforge.rewards import register

@register("explodes")
def explodes(prompt, completion, answer):
    raise ZeroDivisionError("no reward for you")

@register("sleepy")
def sleepy(prompt, completion, answer):
    time.sleep(0.4)
    return 1.0
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reward_role(tmp_path: Path):
    """A reward role process scoring correctness + 0.5 x format, with a raising function registered."""

    def start(rewards: list[dict], env: dict[str, str] | None = None) -> str:
        (tmp_path / "explosive_rewards.py").write_text(RAISING_MODULE)
        spec = {"model": {"path": str(tmp_path)}, "algorithm": {"rewards": rewards}}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        port = _free_port()
        env = {
            **os.environ,
            "KUBEFORGE_JOB": "test",
            "KUBEFORGE_ROLE": "reward",
            "KUBEFORGE_REPLICA": "0",
            "KUBEFORGE_SPEC": str(tmp_path / "spec.json"),
            "KUBEFORGE_HTTP_HOST": "127.0.0.1",
            "KUBEFORGE_HTTP_PORT": str(port),
            "KUBEFORGE_TOKEN_DIR": str(auth.write_token_dir(tmp_path / "tokens", TOKENS, "reward")),
            "PYTHONPATH": str(tmp_path),
            **(env or {}),
        }
        # The raising function is imported before the role reads the spec, as a user's plugin would be.
        code = "import explosive_rewards, runpy; runpy.run_module('kubeforge.rewards', run_name='__main__')"
        process = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("reward role not ready")

    processes: list[subprocess.Popen] = []
    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=15)


def test_role_scores_a_batch_and_counts_it(reward_role):
    url = reward_role([{"name": "correctness", "weight": 1.0}, {"name": "format", "weight": 0.5}])
    items = [
        {"prompt": "abc", "completion": "abc", "answer": "abc"},
        {"prompt": "abc", "completion": "a#", "answer": "abc"},
    ]

    async def call():
        async with RewardClient([url], token=TOKENS["job"]) as client:
            return await client.score("copy", items)

    out = asyncio.run(call())
    assert out["components"]["correctness"] == pytest.approx([1.0, 1 / 3])
    assert out["rewards"] == pytest.approx([1.5, 1 / 3 + 0.25])
    metrics = httpx.get(f"{url}/metrics").text
    assert 'kubeforge_reward_items_total{job="test",namespace="default",replica="0",role="reward"} 2.0' in metrics
    bad = httpx.post(f"{url}/score", json={"items": [{"prompt": "a"}]}, headers=JOB_AUTH)  # no completion
    assert bad.status_code == 422
    # More completions than one request may carry (kubeforge/limits.py): 400, and the role keeps serving.
    too_many = [{"prompt": "a", "completion": "a"}] * 16385
    many = httpx.post(f"{url}/score", json={"items": too_many}, headers=JOB_AUTH, timeout=60)
    assert many.status_code == 400 and "at most 16384 per request (MAX_SCORE_ITEMS)" in many.json()["detail"]
    assert asyncio.run(call())["rewards"] == pytest.approx([1.5, 1 / 3 + 0.25])


def test_a_raising_reward_is_an_error_response_not_a_number(reward_role):
    url = reward_role([{"name": "correctness"}, {"name": "explodes"}])

    async def call():
        async with RewardClient([url], token=TOKENS["job"]) as client:
            return await client.score("copy", [{"prompt": "a", "completion": "a", "answer": "a"}])

    with pytest.raises(RewardError, match="HTTP 500 .*ZeroDivisionError: no reward for you"):
        asyncio.run(call())
    assert (
        'kubeforge_reward_errors_total{job="test",namespace="default",replica="0",role="reward"} 1.0'
        in httpx.get(f"{url}/metrics").text
    )


def test_a_slow_batch_is_answered_within_its_budget_with_the_rest_scored_zero(reward_role, caplog):
    url = reward_role([{"name": "sleepy"}], env={"REWARD_WORKERS": "2"})
    items = [{"prompt": "q", "completion": "a"}] * 10  # 2 threads x 0.4 s: 2 s in all

    async def call():
        # The request carries budget_seconds=1.
        async with RewardClient([url], budget=1.0, token=TOKENS["job"]) as client:
            return await client.score("slow", items)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kubeforge.rewards"):
        out = asyncio.run(call())
    assert time.monotonic() - started < 1.8
    scored = [i for i, reason in enumerate(out["reasons"]) if reason is None]
    assert scored == list(range(len(scored))) and 2 <= len(scored) <= 5  # in order, two at a time
    assert out["rewards"] == [1.0] * len(scored) + [0.0] * (10 - len(scored))
    assert out["reasons"][len(scored) :] == [OUT_OF_BUDGET] * (10 - len(scored))
    assert f"{10 - len(scored)} of 10 items not scored, so 0 ({OUT_OF_BUDGET})" in caplog.text  # the client says so
    metrics = httpx.get(f"{url}/metrics").text
    labels = 'job="test",namespace="default",replica="0",role="reward"'
    assert f"kubeforge_reward_items_total{{{labels}}} {len(scored)}.0" in metrics  # only those scored
    # A budget past the bound is refused (kubeforge/limits.py), like any other bad input.
    too_long = httpx.post(f"{url}/score", json={"items": items[:1], "budget_seconds": 3601}, headers=JOB_AUTH)
    assert too_long.status_code == 422 and "budget_seconds" in too_long.text


def test_registry_holds_the_example_task_rewards():
    assert {"correctness", "format", "exact"} <= set(REGISTRY)


def test_a_dead_replica_is_skipped_with_backoff_and_the_batch_still_scored(reward_role):
    url = reward_role([{"name": "correctness"}])
    with socket.socket() as s:  # a port nobody listens on: a killed replica
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def call():
        async with RewardClient([dead, url], backoff=(0.05, 0.1), token=TOKENS["job"]) as client:
            out = await client.score("copy", [{"prompt": "ab", "completion": "ab", "answer": "ab"}])
            return out, client.retries

    out, retries = asyncio.run(call())
    assert out["rewards"] == [1.0] and retries == 1


def test_a_batch_no_replica_can_score_fails_once_the_retry_time_is_spent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def call():
        async with RewardClient([dead], retry_seconds=0.5, backoff=(0.1, 0.2)) as client:
            await client.score("copy", [{"prompt": "a", "completion": "a", "answer": "a"}])

    with pytest.raises(RewardError, match=r"no reward replica scored the batch within 0 s: ConnectError"):
        asyncio.run(call())


# -- the client against fake replicas --------------------------------------------------------------


async def _replica(behaviour: str, seen: list[dict]) -> tuple[str, asyncio.Server]:
    """A fake replica on a free port that records each request's body, then "answer"s a score of 1 per
    item, stays "silent" until the test ends (a slow replica), or "hangs up" (a replica killed mid-batch)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)[1])
        body = json.loads(await reader.readexactly(length))
        seen.append(body)
        if behaviour == "silent":
            await asyncio.sleep(60)
        if behaviour == "hangs up":
            writer.close()
            return
        n = len(body["items"])
        reply = json.dumps({"rewards": [1.0] * n, "components": {"c": [1.0] * n}, "reasons": [None] * n}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(reply))
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", server


def test_a_batch_is_not_resent_while_a_slow_replica_is_scoring_it():
    async def call():
        slow_seen, other_seen = [], []
        slow, slow_server = await _replica("silent", slow_seen)
        other, other_server = await _replica("answer", other_seen)
        try:
            async with RewardClient([slow, other], budget=0.2, timeout=0.5, backoff=(0.05, 0.1)) as client:
                with pytest.raises(RewardError, match=r"no answer within 0.5 s .* budget of 0.2 s: .*hung.*not resent"):
                    await client.score("copy", [{"prompt": "a", "completion": "a", "answer": "a"}])
                return slow_seen, other_seen, client.retries
        finally:
            slow_server.close()
            other_server.close()

    slow_seen, other_seen, retries = asyncio.run(call())
    assert [body["budget_seconds"] for body in slow_seen] == [0.2]  # the replica was told the client's budget
    assert other_seen == [] and retries == 0


def test_a_batch_is_resent_when_its_replica_dies_before_answering():
    async def call():
        dying_seen, other_seen = [], []
        dying, dying_server = await _replica("hangs up", dying_seen)
        other, other_server = await _replica("answer", other_seen)
        try:
            async with RewardClient([dying, other], backoff=(0.05, 0.1)) as client:
                out = await client.score("copy", [{"prompt": "a", "completion": "a", "answer": "a"}])
                return out, len(dying_seen), len(other_seen), client.retries
        finally:
            dying_server.close()
            other_server.close()

    # Nobody is scoring the batch any more: the next replica gets it.
    assert asyncio.run(call()) == ({"rewards": [1.0], "components": {"c": [1.0]}, "reasons": [None]}, 1, 1, 1)


def test_the_client_waits_longer_than_the_budget_it_sends():
    client = RewardClient(["http://127.0.0.1:1"])
    assert (client.budget, client.timeout) == (DEFAULT_BUDGET_S, DEFAULT_BUDGET_S + ANSWER_MARGIN_S)
    asyncio.run(client.close())
    with pytest.raises(ValueError, match=r"timeout \(10 s\) must be longer than the budget \(10 s\)"):
        RewardClient(["http://127.0.0.1:1"], budget=10, timeout=10)
    with pytest.raises(ValueError, match="budget: got 7200 s; expected more than 0, at most 3600"):
        RewardClient(["http://127.0.0.1:1"], budget=7200)
