"""Evaluation numbers from sampled rewards: the unbiased pass@k estimator and per-prompt aggregates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no cancellation.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: got c={c} correct of n={n} samples; expected 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: got k={k} with n={n} samples; expected 1 <= k <= n (sample at least k per prompt)")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    failing = 1.0
    for i in range(n - c + 1, n + 1):
        failing *= 1.0 - k / i
    return 1.0 - failing


def summarize(
    rewards: Sequence[Sequence[float]], *, ks: Iterable[int] = (1,), threshold: float = 1.0
) -> dict[str, float]:
    """{"mean_reward", "pass@k" for each k} over prompts; `rewards[p]` holds prompt p's sample rewards.

    A sample is correct when its reward is >= `threshold`. Each prompt counts once, whatever its
    number of samples: mean_reward is the mean of per-prompt means, pass@k the mean of per-prompt pass@k.
    """
    if not rewards or any(len(r) == 0 for r in rewards):
        raise ValueError("summarize: expected at least one prompt, each with at least one sample reward")
    wanted = sorted(set(ks))
    fewest = min(len(r) for r in rewards)
    if not wanted or wanted[0] < 1 or wanted[-1] > fewest:
        raise ValueError(f"summarize: got ks={wanted}; expected each k in 1..{fewest} (the fewest samples of a prompt)")
    out = {"mean_reward": sum(sum(r) / len(r) for r in rewards) / len(rewards)}
    correct = [sum(x >= threshold for x in r) for r in rewards]
    for k in wanted:
        out[f"pass@{k}"] = sum(pass_at_k(len(r), c, k) for r, c in zip(rewards, correct, strict=True)) / len(rewards)
    return out
