"""The math reward: answer extraction and equivalence on a hand-written case table, the sympy sandbox
(timeout, pool, environment), a batch of slow answers against its budget, and the `math` /
`math_format` rewards served by the real reward role over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubeforge.algorithm import Algorithm
from kubeforge.rewards import REGISTRY, RewardClient, RewardError, sandbox
from kubeforge.rewards.functions import from_algorithm
from kubeforge.rewards.math import answers_match, correctness, extract_answer, format_reward
from kubeforge.rewards.sandbox import SympyPool, SympyWorker, configured_workers, cpu_count
from kubeforge.rewards.scoring import OUT_OF_BUDGET, score
from test_rewards import TOKENS, reward_role  # noqa: F401 - the fixture that starts a real reward role

HUGE = "9" * 5000  # past Python's int-parsing limit and MAX_ANSWER_CHARS

CASES = [
    # (completion, reference answer, reward)
    # -- marked answers
    (r"So the total is \boxed{18}.", "18", 1.0),
    (r"$\boxed{18}$.", "18", 1.0),
    (r"\boxed{18.0}", "18", 1.0),
    (r"\boxed{18.00}", "18", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{18 \text{ dollars}}", "18", 1.0),
    (r"\boxed{72 clips}", "72", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{\boxed{7}}", "7", 1.0),
    ("<answer>72</answer>", "72", 1.0),
    ("<answer> 72. </answer>", "72", 1.0),
    ("<ANSWER>9</ANSWER>", "9", 1.0),
    # -- precedence: boxed, then <answer>, then the last number; the last of several wins
    (r"There are 5 boxes, so \boxed{6}", "6", 1.0),
    (r"<answer>4</answer> but really \boxed{5}", "5", 1.0),
    (r"<answer>4</answer> but really \boxed{5}", "4", 0.0),
    (r"First \boxed{3}, no wait: \boxed{4}", "4", 1.0),
    (r"First \boxed{3}, no wait: \boxed{4}", "3", 0.0),
    ("<answer>3</answer> <answer>8</answer>", "8", 1.0),
    ("So she sold 48 + 24 = 72 clips.", "72", 1.0),
    ("She has 18 apples", "18", 1.0),
    # -- numbers: separators, signs, decimals, fractions, percentages
    ("She has 1,234 apples.", "1234", 1.0),
    (r"\boxed{1,234}", "1234", 1.0),
    (r"\boxed{1{,}234}", "1,234", 1.0),
    (r"\boxed{1234}", "$1,234", 1.0),
    (r"\boxed{1,23}", "123", 0.0),  # not a thousands separator
    (r"\boxed{-5}", "-5", 1.0),
    ("\\boxed{\u22125}", "-5", 1.0),  # unicode minus
    ("The temperature fell to \u22125 degrees.", "-5", 1.0),
    ("The change is -7.", "-7", 1.0),
    (r"\boxed{5}", "-5", 0.0),
    (r"\boxed{.5}", "0.5", 1.0),
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    (r"\boxed{3/4}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{0.333}", "1/3", 0.0),  # exact rational equality, no tolerance
    (r"\boxed{25\%}", "25", 1.0),
    (r"\boxed{25\%}", "0.25", 1.0),
    (r"\boxed{0.25}", "25%", 1.0),
    (r"\boxed{5\%}", "5%", 1.0),
    (r"\boxed{25\%}", "0.5", 0.0),
    (r"\boxed{123456789012345678901234567890}", "123456789012345678901234567890", 1.0),
    (r"\boxed{123456789012345678901234567891}", "123456789012345678901234567890", 0.0),
    (r"\boxed{18}", "19", 0.0),
    # -- expressions, through sympy
    (r"\boxed{2\sqrt{2}}", "sqrt(8)", 1.0),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{\sqrt[3]{8}}", "2", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\left(\frac{1}{2}\right)^2}", "0.25", 1.0),
    (r"\boxed{x+1}", "1+x", 1.0),
    (r"\boxed{(x-1)(x+1)}", "x^2-1", 1.0),
    (r"\boxed{2x}", "2", 0.0),
    (r"\boxed{\pi}", "3.14159", 0.0),
    (r"\boxed{5/0}", "5", 0.0),
    # -- malformed output: a 0, never an error
    ("", "18", 0.0),
    ("   \n", "18", 0.0),
    ("I do not know.", "18", 0.0),
    (r"\boxed{}", "18", 0.0),
    (r"\boxed{eighteen}", "18", 0.0),
    (r"The answer is \boxed{12", "12", 1.0),  # unclosed: skipped, and the last number is 12
    (r"The answer is \boxed{12", "13", 0.0),
    ("<answer>18", "18", 1.0),  # unclosed tag: the last number
    (r"\boxed{\frac{1}{2}", "0.5", 0.0),  # unclosed: the last number is 2
    (r"\boxed{\frac{1}}", "1", 0.0),
    (r"\boxed{\unknowncommand{3}}", "3", 0.0),
    (r"\boxed{__import__('os').system('false')}", "0", 0.0),  # outside the grammar: never evaluated
    (r"\boxed{" + HUGE + "}", "18", 0.0),
    (f"The answer is {HUGE}", HUGE, 0.0),  # too long to be an answer, even a right one
    ("\x00\ufffd\U0001f600", "18", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "expected"), CASES)
def test_math_reward_case_table(completion, answer, expected):
    assert correctness("", completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "extracted"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{ \{1, 2\} }", r" \{1, 2\} "),  # escaped braces do not close the box
        (r"\fbox{3}", "3"),
        ("<answer>\n42\n</answer> and 7", "\n42\n"),
        ("between 3 and 4.5 and then -2/3.", "-2/3"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extraction_follows_the_documented_precedence(completion, extracted):
    assert extract_answer(completion) == extracted


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"Reasoning... \boxed{18}", 1.0),
        ("<answer>18</answer>", 1.0),
        ("so 18", 0.0),
        (r"\boxed{}", 0.0),
        ("<answer>  </answer>", 0.0),
        (r"\boxed{18", 0.0),
        ("", 0.0),
    ],
)
def test_math_format_rewards_a_marked_answer(completion, expected):
    assert format_reward("", completion, "18") == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("\\boxed{" * 30_000, 0.0),  # every box unclosed
        ("<answer>" * 30_000 + "</answer>", 0.0),
        ("<answer>" * 30_000 + "18</answer>", 1.0),
        ("{" * 100_000 + "18", 1.0),
        ("\\text{" * 30_000 + "18 " * 30_000, 1.0),
        ("1 " * 100_000 + "\\boxed{18}", 1.0),
    ],
)
def test_long_adversarial_completions_are_scored_in_linear_time(completion, expected):
    started = time.monotonic()
    assert correctness("", completion, "18") == expected
    format_reward("", completion, "18")
    assert time.monotonic() - started < 5  # quadratic scans of these take minutes


def test_an_item_without_a_reference_answer_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="answer is empty"):
        correctness("q", r"\boxed{1}", "  ")


def test_the_rewards_are_registered():
    assert REGISTRY["math"] is correctness
    assert REGISTRY["math_format"] is format_reward


def test_a_pathological_expression_times_out_to_zero_and_the_worker_recovers(monkeypatch):
    pool = SympyPool(1, timeout=2.0)
    monkeypatch.setattr(sandbox, "_pool", pool)
    try:
        assert answers_match("x+1", "1+x")  # warm: the child has started
        started = time.monotonic()
        assert not answers_match(r"9^{9^{9}}", "5")  # 9**387420489 would take minutes
        assert time.monotonic() - started < 10
        assert pool.restarts == 1
        assert answers_match(r"2\sqrt{2}", "sqrt(8)")  # a fresh child answers
        # A batch's deadline cuts a comparison short (the child is killed), and past it none begins.
        started = time.monotonic()
        assert not pool.equivalent("9**(9**(9))", "5", deadline=started + 0.5)
        assert time.monotonic() - started < 1.5 and pool.restarts == 2
        assert not pool.equivalent("x", "x", deadline=time.monotonic())
        assert pool.restarts == 2 and pool.workers[0]._process is None  # no child was started for it
    finally:
        pool.close()


# A comparison that takes the whole per-answer timeout: 9**387420489 takes minutes.
SLOW = {"prompt": "q", "completion": r"\boxed{9^{9^{9}}}", "answer": "5"}
MATH = from_algorithm(Algorithm.model_validate({"rewards": [{"name": "math"}]}))


@pytest.fixture
def slow_pool(monkeypatch):
    """The process's sandbox: 2 children, started, that give up on a comparison after 1 s."""
    pool = SympyPool(2, timeout=1.0)
    pool.start()
    monkeypatch.setattr(sandbox, "_pool", pool)
    yield pool
    pool.close()


def test_the_slow_answers_of_a_batch_are_compared_in_parallel_children(slow_pool):
    started = time.monotonic()
    out = score(MATH, [SLOW] * 2, threads=2)
    elapsed = time.monotonic() - started
    assert out["rewards"] == [0.0] * 2 and out["reasons"] == [None] * 2  # too slow to compare: wrong, not unscored
    assert slow_pool.restarts == 2  # each ran to its timeout in a child of its own, and that child was killed
    # One child after the other: 1 s, a restart (about 1 s), 1 s.
    assert elapsed < 1.9, f"{elapsed:.1f} s: the two 1 s timeouts did not overlap"


def test_a_batch_of_slow_answers_ends_at_its_budget_with_the_rest_scored_zero_and_a_reason(slow_pool):
    # 6 answers that would each take the whole 1 s timeout: 3 s and more on 2 children, in a 0.8 s budget.
    items = [{"prompt": "q", "completion": r"\boxed{18}", "answer": "18"}] + [SLOW] * 6
    started = time.monotonic()
    out = score(MATH, items, threads=2, deadline=started + 0.8)
    elapsed = time.monotonic() - started
    assert elapsed < 1.2, f"{elapsed:.1f} s: the batch outlived its 0.8 s budget"
    assert out["rewards"] == [1.0] + [0.0] * 6 and out["components"]["math"] == out["rewards"]
    assert out["reasons"] == [None] + [OUT_OF_BUDGET] * 6
    # The two comparisons running at the deadline were cut off there: their children killed, not left computing.
    while slow_pool.restarts < 2 and time.monotonic() - started < 1.5:
        time.sleep(0.01)
    assert slow_pool.restarts == 2


def test_the_pool_size_is_the_cpu_count_capped_or_reward_workers():
    assert configured_workers({}) == min(cpu_count(), sandbox.DEFAULT_MAX_WORKERS) >= 1
    assert configured_workers({"REWARD_WORKERS": " 3 "}) == 3
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match=rf"REWARD_WORKERS='{bad}': expected a whole number >= 1"):
            configured_workers({"REWARD_WORKERS": bad})


def test_a_sandbox_child_sees_no_credentials(monkeypatch):
    monkeypatch.setenv("KUBEFORGE_TOKEN", "job-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    worker = SympyWorker()
    try:
        worker.start()
        environ = Path(f"/proc/{worker._process.pid}/environ").read_bytes()
        assert b"secret" not in environ and b"PYTHONPATH=" in environ
        assert worker.equivalent("x+1", "1+x")  # and it still compares
    finally:
        worker.close()


def test_a_stuck_worker_dies_with_its_host_process():
    host_code = (
        "from kubeforge.rewards.sandbox import SympyWorker; w = SympyWorker(timeout=600); w.equivalent('x', 'x'); "
        "print(w._process.pid, flush=True); w.equivalent('9**(9**(9))', '5')"
    )
    host = subprocess.Popen([sys.executable, "-c", host_code], stdout=subprocess.PIPE, text=True)
    child = Path(f"/proc/{int(host.stdout.readline())}/status")
    host.kill()
    host.wait()
    host.stdout.close()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the sympy worker outlived its host"


def _running(status: Path) -> bool:
    """Whether the process of this /proc status file runs (a zombie has stopped: nobody reaped it yet)."""
    try:
        return "\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def test_role_serves_math_rewards_over_http(reward_role):  # noqa: F811 - the imported fixture
    url = reward_role([{"name": "math", "weight": 1.0}, {"name": "math_format", "weight": 0.1}])
    items = [
        {"prompt": "q", "completion": r"So \boxed{1,234}.", "answer": "1234"},
        {"prompt": "q", "completion": "She has 18 apples.", "answer": "18"},
        {"prompt": "q", "completion": r"\boxed{2\sqrt{2}}", "answer": "sqrt(8)"},
        {"prompt": "q", "completion": r"\boxed{17}", "answer": "18"},
        {"prompt": "q", "completion": r"\boxed{9^{9^{9}}", "answer": "18"},  # unclosed, last number 9
        {"prompt": "q", "completion": "", "answer": "18"},
    ]

    async def call(batch):
        async with RewardClient([url], token=TOKENS["job"]) as client:
            return await client.score("gsm8k", batch)

    out = asyncio.run(call(items))
    assert out["components"] == {"math": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "math_format": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]}
    assert out["rewards"] == pytest.approx([1.1, 1.0, 1.1, 0.1, 0.0, 0.0])
    with pytest.raises(RewardError, match="HTTP 500 .*answer is empty"):
        asyncio.run(call([{"prompt": "q", "completion": r"\boxed{1}"}]))  # no reference answer
