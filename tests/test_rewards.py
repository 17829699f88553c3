"""Reward functions on hand-written cases, and the reward role over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kubeforge.rewards import REGISTRY, RewardClient, RewardError, register
from kubeforge.rewards.functions import correctness, exact, format_reward, from_algorithm, score


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
    rewards = from_algorithm({"rewards": [{"name": "correctness", "weight": 1.0}, {"name": "format", "weight": 0.5}]})
    out = score(
        rewards,
        [{"prompt": "ab", "completion": "ab", "answer": "ab"}, {"prompt": "ab", "completion": "bz", "answer": "ab"}],
    )
    assert out["components"] == {"correctness": [1.0, 0.0], "format": [1.0, 0.5]}
    assert out["rewards"] == pytest.approx([1.5, 0.25])


def test_unknown_reward_name_is_refused_with_the_field():
    with pytest.raises(ValueError, match=r"spec.algorithm.rewards\[0\].name: got 'corectness'; expected one of"):
        from_algorithm({"rewards": [{"name": "corectness"}]})


def test_default_is_correctness_alone():
    assert [r.name for r in from_algorithm({})] == ["correctness"]


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register("correctness")(lambda p, c, a: 0.0)


# -- the role over HTTP ----------------------------------------------------------------------------

# A plugin module that the role process imports first: it registers a reward function that raises.
RAISING_MODULE = """
from kubeforge.rewards import register

@register("explodes")
def explodes(prompt, completion, answer):
    raise ZeroDivisionError("no reward for you")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reward_role(tmp_path: Path):
    """A reward role process scoring correctness + 0.5 x format, with a raising function registered."""

    def start(rewards: list[dict]) -> str:
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
            "PYTHONPATH": str(tmp_path),
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
        async with RewardClient([url]) as client:
            return await client.score("copy", items)

    out = asyncio.run(call())
    assert out["components"]["correctness"] == pytest.approx([1.0, 1 / 3])
    assert out["rewards"] == pytest.approx([1.5, 1 / 3 + 0.25])
    metrics = httpx.get(f"{url}/metrics").text
    assert 'kubeforge_reward_items_total{job="test",namespace="default",replica="0",role="reward"} 2.0' in metrics
    bad = httpx.post(f"{url}/score", json={"items": [{"prompt": "a"}]})  # no completion
    assert bad.status_code == 422
    # More completions than one request may carry (kubeforge/limits.py): 400, and the role keeps serving.
    many = httpx.post(f"{url}/score", json={"items": [{"prompt": "a", "completion": "a"}] * 16385}, timeout=60)
    assert many.status_code == 400 and "at most 16384 per request (MAX_SCORE_ITEMS)" in many.json()["detail"]
    assert asyncio.run(call())["rewards"] == pytest.approx([1.5, 1 / 3 + 0.25])


def test_a_raising_reward_is_an_error_response_not_a_number(reward_role):
    url = reward_role([{"name": "correctness"}, {"name": "explodes"}])

    async def call():
        async with RewardClient([url]) as client:
            return await client.score("copy", [{"prompt": "a", "completion": "a", "answer": "a"}])

    with pytest.raises(RewardError, match="HTTP 500 .*ZeroDivisionError: no reward for you"):
        asyncio.run(call())
    assert (
        'kubeforge_reward_errors_total{job="test",namespace="default",replica="0",role="reward"} 1.0'
        in httpx.get(f"{url}/metrics").text
    )


def test_registry_holds_the_example_task_rewards():
    assert {"correctness", "format", "exact"} <= set(REGISTRY)


def test_a_dead_replica_is_skipped_with_backoff_and_the_batch_still_scored(reward_role):
    url = reward_role([{"name": "correctness"}])
    with socket.socket() as s:  # a port nobody listens on: a killed replica
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def call():
        async with RewardClient([dead, url], backoff=(0.05, 0.1)) as client:
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
