"""Group advantages and the dynamic-sampling filter, checked by hand-computed values."""

import statistics

import pytest
from kubeforge.advantages import group_advantages, informative_groups

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0]  # three groups of 4


def test_grpo_advantages_are_standardised_within_each_group():
    advantages = group_advantages(REWARDS, 4)
    for g in range(3):
        group = REWARDS[4 * g : 4 * g + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)  # sample std, as torch.std
        expected = [(r - mean) / (std + 1e-6) for r in group]
        assert advantages[4 * g : 4 * g + 4] == pytest.approx(expected, abs=1e-6)
    assert advantages[4:8] == [0.0] * 4  # identical rewards: no signal


def test_dr_grpo_advantages_only_subtract_the_mean():
    advantages = group_advantages(REWARDS, 4, scale_by_std=False)
    assert advantages == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1.0, -1.0, 0.0, 0.0])


def test_informative_groups_have_different_rewards():
    assert informative_groups(REWARDS, 4) == [True, False, True]
    assert informative_groups([3.0], 1) == [False]


@pytest.mark.parametrize("fn", [group_advantages, informative_groups])
def test_rewards_must_split_into_whole_groups(fn):
    with pytest.raises(ValueError, match="group_size: got 5; expected a divisor of the 12 rewards"):
        fn(REWARDS, 5)
    with pytest.raises(ValueError, match="group_size: got 0"):
        fn(REWARDS, 0)
