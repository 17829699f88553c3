"""Group-relative advantages (GRPO, Dr. GRPO) and DAPO's dynamic-sampling filter.

Rewards come in groups: `group_size` consecutive samples of the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _groups(rewards: Sequence[float], group_size: int) -> torch.Tensor:
    """[groups, group_size] in float32, as the batch holds them; refuses rewards that are not whole groups."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"group_size: got {group_size}; expected a divisor of the {len(rewards)} rewards")
    return torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)


def group_advantages(
    rewards: Sequence[float], group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> list[float]:
    """Each reward minus its group's mean; over the group's std (GRPO) unless `scale_by_std` is False (Dr. GRPO).

    A group whose samples all scored the same has no signal: its advantages are 0.
    """
    r = _groups(rewards, group_size)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r)
        advantages = advantages / (std + eps)
    return advantages.flatten().tolist()


def informative_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group: whether its rewards differ (DAPO's dynamic sampling keeps only these: the others give no gradient)."""
    r = _groups(rewards, group_size)
    return (r.amax(dim=1) > r.amin(dim=1)).tolist()
