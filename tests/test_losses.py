"""The GRPO loss against a plain, token-by-token reference written from the formulas."""

import math

import pytest
import torch
from kubeforge.losses import grpo_loss

EPS_LOW, EPS_HIGH, KL_COEF = 0.2, 0.28, 0.05


def make_batch(seed=0, batch=4, length=7):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(batch, length, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # Behaviour logprobs near the new ones so that some ratios fall inside the clip range, some outside.
    behaviour = logprobs.detach() + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.3
    ref = logprobs.detach() + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.2
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, (start, end) in enumerate([(2, 7), (3, 5), (1, 7), (4, 6)][:batch]):
        mask[row, start:end] = True
    behaviour[~mask] = -math.inf  # whatever sits outside the response must not matter
    return logprobs, behaviour, advantages, mask, ref


def reference_loss(logprobs, behaviour, advantages, mask, ref, kl_coef):
    """One token at a time, straight from the definitions; mean over every response token."""
    terms, ratios, clipped, kls = [], [], [], []
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if not mask[b, t]:
                continue
            a = advantages[b]
            ratio = torch.exp(logprobs[b, t] - behaviour[b, t])
            unclipped_obj = ratio * a
            clipped_obj = torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a
            term = -torch.minimum(unclipped_obj, clipped_obj)
            if ref is not None:
                log_r = ref[b, t] - logprobs[b, t]
                kl = torch.exp(log_r) - log_r - 1
                kls.append(kl.item())
                term = term + kl_coef * kl
            terms.append(term)
            ratios.append(ratio.item())
            # the gradient vanishes where the clipped objective is the smaller one and is flat
            clipped.append(float(clipped_obj.item() < unclipped_obj.item()))
    n = len(terms)
    metrics = {"ratio_mean": sum(ratios) / n, "clip_fraction": sum(clipped) / n}
    if ref is not None:
        metrics["kl"] = sum(kls) / n
    return torch.stack(terms).sum() / n, metrics


@pytest.mark.parametrize("with_ref", [False, True])
def test_loss_and_gradients_match_the_reference(with_ref):
    logprobs, behaviour, advantages, mask, ref = make_batch()
    ref = ref if with_ref else None
    kl_coef = KL_COEF if with_ref else 0.0

    loss, metrics = grpo_loss(
        logprobs, behaviour, advantages, mask, ref, clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH, kl_coef=kl_coef
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected, expected_metrics = reference_loss(logprobs, behaviour, advantages, mask, ref, kl_coef)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    assert grad[~mask].abs().max() == 0
    assert set(metrics) == set(expected_metrics)
    for name, value in expected_metrics.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6), name
    # the batch exercises both sides of the clip
    assert 0 < expected_metrics["clip_fraction"] < 1


def test_per_token_advantages_and_an_external_token_count():
    logprobs, behaviour, advantages, mask, _ = make_batch(seed=1)
    per_token = advantages[:, None].expand_as(logprobs)
    loss_seq, _ = grpo_loss(logprobs, behaviour, advantages, mask)
    loss_tok, _ = grpo_loss(logprobs, behaviour, per_token, mask)
    assert loss_tok.item() == pytest.approx(loss_seq.item(), abs=1e-12)

    # Two shards normalised by the batch-wide count add up to the whole batch's loss (data parallelism).
    total = mask.sum()
    shards = [
        grpo_loss(logprobs[rows], behaviour[rows], advantages[rows], mask[rows], num_tokens=total)
        for rows in (slice(0, 1), slice(1, None))
    ]
    assert sum(loss for loss, _ in shards).item() == pytest.approx(loss_seq.item(), abs=1e-12)
    ratio = sum(m["ratio_mean"] for _, m in shards)
    assert ratio.item() == pytest.approx(grpo_loss(logprobs, behaviour, advantages, mask)[1]["ratio_mean"].item())


def test_on_policy_the_gradient_is_the_policy_gradient():
    # With behaviour == new logprobs the ratio is 1 and d loss / d logp = -A / num_tokens.
    logprobs, _, advantages, mask, _ = make_batch(seed=2)
    loss, metrics = grpo_loss(logprobs, logprobs.detach(), advantages, mask)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.where(mask, -advantages[:, None] / mask.sum(), 0.0)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_fraction"].item() == 0.0
