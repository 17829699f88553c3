"""Reward role: reward functions served over HTTP, batched (`POST /score`)."""

from kubeforge.rewards.client import RewardClient, RewardError
from kubeforge.rewards.functions import REGISTRY, register

__all__ = ["REGISTRY", "RewardClient", "RewardError", "register"]
