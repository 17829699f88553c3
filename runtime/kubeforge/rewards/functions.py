"""Reward functions and their registry.

A reward function scores one completion: `fn(prompt, completion, answer) -> float`. Functions
are registered by name; spec.algorithm.rewards picks which ones run and their weights, e.g.
`rewards: [{name: correctness, weight: 1.0}, {name: format, weight: 0.1}]`. A batch is scored by
kubeforge.rewards.scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kubeforge.algorithm import Algorithm
from kubeforge.rewards import math as math_rewards

RewardFn = Callable[[str, str, str], float]

REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward function available under `name`."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward function {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return add


@register("correctness")
def correctness(prompt: str, completion: str, answer: str) -> float:
    """Partial credit: characters at the right position, over the longer of answer and completion.

    Exact answers score 1; extra or missing characters cost as much as wrong ones, so the policy
    also learns where to stop. Partial credit gives a random policy some signal to start from.
    """
    completion = completion.strip()
    if not answer or not completion:
        return 0.0
    hits = sum(a == b for a, b in zip(completion, answer, strict=False))
    return hits / max(len(answer), len(completion))


@register("exact")
def exact(prompt: str, completion: str, answer: str) -> float:
    """1 for exactly the answer (surrounding whitespace ignored), else 0."""
    return float(completion.strip() == answer.strip())


@register("format")
def format_reward(prompt: str, completion: str, answer: str) -> float:
    """Share of the completion's characters drawn from the answer's alphabet (the prompt's characters).

    Malformed output (empty, other symbols) scores 0; it is the first thing a random policy learns.
    """
    completion = completion.strip()
    if not completion:
        return 0.0
    alphabet = set(prompt) | set(answer)
    return sum(c in alphabet for c in completion) / len(completion)


# Math answers (GSM8K-style tasks): see kubeforge.rewards.math for extraction and equivalence.
register("math")(math_rewards.correctness)
register("math_format")(math_rewards.format_reward)


@dataclass(frozen=True)
class WeightedReward:
    name: str
    weight: float
    fn: RewardFn


def from_algorithm(algorithm: Algorithm) -> list[WeightedReward]:
    """The reward functions spec.algorithm.rewards names; the schema holds plain names, checked here
    against the registry (which user code may extend with `register`)."""
    rewards = []
    for i, entry in enumerate(algorithm.rewards):
        if entry.name not in REGISTRY:
            raise ValueError(
                f"spec.algorithm.rewards[{i}].name: got {entry.name!r}; expected one of {', '.join(sorted(REGISTRY))}"
            )
        rewards.append(WeightedReward(entry.name, entry.weight, REGISTRY[entry.name]))
    return rewards
