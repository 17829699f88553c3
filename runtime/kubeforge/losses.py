"""GRPO-family policy losses.

The loss is computed per response token and averaged over every response token of the whole
batch (token-level normalisation, as in DAPO and TRL's `loss_type="dapo"`): long and short
responses weigh the same per token. Under data parallelism each rank passes the batch-wide
token count as `num_tokens`, so the ranks' losses and metrics simply add up.
"""

from __future__ import annotations

import torch


def grpo_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped importance-weighted policy-gradient loss, with an optional KL penalty.

    Args:
        logprobs: [B, T] log-probabilities of the taken tokens under the policy being trained.
        behaviour_logprobs: [B, T] the same, as reported by the generator that sampled them.
        advantages: [B] per sequence or [B, T] per token.
        mask: [B, T], true (or 1) on response tokens; everything else is ignored.
        ref_logprobs: [B, T] under the reference model, for the KL penalty (k3 estimator).
        clip_eps_low, clip_eps_high: the ratio is clipped to [1 - low, 1 + high].
        kl_coef: weight of the KL penalty; 0 leaves it out.
        num_tokens: the normaliser; default the mask's token count.

    Returns the scalar loss and detached metrics, each a token mean over `num_tokens`:
    `ratio_mean`, `clip_fraction` (tokens whose gradient the clip removed) and, with a
    reference, `kl`.
    """
    mask = mask.to(logprobs.dtype)
    if num_tokens is None:
        num_tokens = mask.sum()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)

    def token_mean(values: torch.Tensor) -> torch.Tensor:
        return (values * mask).sum() / num_tokens

    # Masked before exp: positions outside the response may hold anything, even -inf.
    log_ratio = torch.where(mask.bool(), logprobs - behaviour_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - clip_eps_low) & (advantages < 0)) | ((ratio > 1 + clip_eps_high) & (advantages > 0))

    metrics = {"ratio_mean": token_mean(ratio.detach()), "clip_fraction": token_mean(clipped.to(mask.dtype))}
    if ref_logprobs is not None:
        # k3 = exp(ref - new) - (ref - new) - 1: an unbiased, non-negative estimate of KL(new || ref).
        delta = torch.where(mask.bool(), ref_logprobs - logprobs, 0.0)
        kl = torch.exp(delta) - delta - 1
        metrics["kl"] = token_mean(kl.detach())
        if kl_coef:
            per_token = per_token + kl_coef * kl
    return token_mean(per_token), metrics
