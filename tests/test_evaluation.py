"""pass@k against brute-force enumeration of k-subsets, and the per-prompt aggregation."""

from __future__ import annotations

import itertools
import math

import pytest
from kubeforge.evaluation import pass_at_k, summarize


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The share of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(samples, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct_and_edges_are_exact():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # 4 wrong samples cannot fill a 5-subset


def test_pass_at_k_is_stable_where_binomials_are_huge():
    n, c, k = 2000, 3, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python's exact integers, for reference
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert 0.0 < pass_at_k(100_000, 1, 1) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [(4, 5, 1, "c=5 correct of n=4"), (4, -1, 1, "c=-1"), (4, 1, 5, "k=5 with n=4"), (4, 1, 0, "k=0")],
)
def test_pass_at_k_refuses_impossible_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_summarize_averages_per_prompt():
    rewards = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 1.0], [0.0, 0.2, 0.0, 0.0]]
    out = summarize(rewards, ks=(1, 2, 4), threshold=1.0)
    assert set(out) == {"mean_reward", "pass@1", "pass@2", "pass@4"}
    assert out["mean_reward"] == pytest.approx((0.25 + 0.875 + 0.05) / 3)
    for k in (1, 2, 4):
        expected = sum(brute_force_pass_at_k([x >= 1.0 for x in r], k) for r in rewards) / 3
        assert out[f"pass@{k}"] == pytest.approx(expected)
    assert out["pass@1"] == pytest.approx((0.25 + 0.75 + 0.0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)


def test_summarize_threshold_decides_what_counts_as_correct():
    rewards = [[0.5, 0.9], [0.1, 0.2]]
    assert summarize(rewards, threshold=0.5)["pass@1"] == pytest.approx(0.5)
    assert summarize(rewards, threshold=0.95)["pass@1"] == 0.0


def test_summarize_with_unequal_sample_counts_weighs_prompts_equally():
    out = summarize([[1.0], [0.0, 0.0, 0.0]], ks=(1,))
    assert out == {"mean_reward": 0.5, "pass@1": 0.5}


@pytest.mark.parametrize(
    ("rewards", "ks", "message"),
    [
        ([], (1,), "at least one prompt"),
        ([[1.0], []], (1,), "at least one sample"),
        ([[1.0, 0.0], [1.0]], (2,), r"ks=\[2\]; expected each k in 1..1"),
        ([[1.0]], (), r"ks=\[\]"),
    ],
)
def test_summarize_refuses_what_it_cannot_estimate(rewards, ks, message):
    with pytest.raises(ValueError, match=message):
        summarize(rewards, ks=ks)
