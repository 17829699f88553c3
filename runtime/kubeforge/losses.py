"""The trainer's losses: the GRPO family, supervised fine-tuning, a KL penalty and truncated importance sampling.

Each variant is one small function with the same signature, `(inputs, eps_low, eps_high) ->
(per-token loss terms [B, T], where its clip acted [B, T])`, registered in `LOSSES` with how its
terms are averaged (`Normalise`), its clip defaults and whether the app scales its advantages by
the group's std. `policy_loss` does the shared part: the ratio's reference, the TIS weight, the KL
term and the average, as the job's `LossSettings` (spec.algorithm's loss keys) ask. docs/algorithms.md
gives every formula.

Data parallelism: every normaliser (tokens, sequences, longest response) is the whole batch's
(`Normalisers.of(batch mask)`), handed to each rank and micro-batch, so the ranks' losses and
metrics simply add up to the whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from kubeforge.algorithm import LossSettings


class Normalise(Enum):
    TOKEN = "token"  # sum over every response token of the batch / the batch's tokens (DAPO)
    SEQUENCE = "sequence"  # each sequence's token mean, then the mean over sequences (GRPO)
    BUDGET = "budget"  # sum over tokens / (longest response x sequences), a constant per batch (Dr. GRPO)


@dataclass(frozen=True)
class Normalisers:
    """Batch-wide counts, identical on every rank and micro-batch."""

    tokens: float  # response tokens
    sequences: float  # rows with at least one response token
    max_length: float  # response tokens of the longest row

    @classmethod
    def of(cls, mask: torch.Tensor) -> Normalisers:
        lengths = mask.sum(-1)
        return cls(tokens=float(lengths.sum()), sequences=float((lengths > 0).sum()), max_length=float(lengths.max()))


@dataclass(frozen=True)
class PolicyInputs:
    """What a variant sees. `old_logprobs` is what the ratio compares against (see `policy_loss`)."""

    logprobs: torch.Tensor  # [B, T] under the policy being trained (with gradient)
    old_logprobs: torch.Tensor  # [B, T] detached
    advantages: torch.Tensor  # [B, 1] or [B, T]
    mask: torch.Tensor  # [B, T] bool


VariantFn = Callable[[PolicyInputs, float, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Variant:
    fn: VariantFn  # -> per-token loss [B, T], per-token "the clip removed this token's gradient" [B, T] bool
    normalise: Normalise
    clip_eps_low: float
    clip_eps_high: float
    policy_gradient: bool = True  # False: behaviour logprobs, advantages, TIS and KL play no part
    # Whether the app divides each group's advantages by the group's std (kubeforge.advantages):
    # GRPO's normalisation; Dr. GRPO drops it, since it biases towards groups of near-equal rewards.
    scale_advantages_by_std: bool = True


def token_ratio(inputs: PolicyInputs) -> torch.Tensor:
    # Masked before exp: positions outside the response may hold anything, even -inf.
    return torch.exp(torch.where(inputs.mask, inputs.logprobs - inputs.old_logprobs, 0.0))


def clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's -min(r A, clip(r) A) and where the clip took the gradient away."""
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return loss, clipped


def ppo_clip(inputs: PolicyInputs, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO, Dr. GRPO and DAPO share the token-level clipped ratio; they differ in the average."""
    return clipped_objective(token_ratio(inputs), inputs.advantages, eps_low, eps_high)


def gspo(inputs: PolicyInputs, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence ratio s = exp(mean log-ratio over the response), clipped per sequence.

    Written in GSPO-token form, s_t = sg(s) * p_t / sg(p_t): equal to s in value and in gradient
    when the advantage is per sequence, and it also takes per-token advantages.
    """
    log_ratio = torch.where(inputs.mask, inputs.logprobs - inputs.old_logprobs, 0.0)
    lengths = inputs.mask.sum(-1, keepdim=True).clamp(min=1)
    sequence_ratio = torch.exp(log_ratio.sum(-1, keepdim=True) / lengths).detach()
    logprobs = torch.where(inputs.mask, inputs.logprobs, 0.0)
    ratio = sequence_ratio * torch.exp(logprobs - logprobs.detach())
    return clipped_objective(ratio, inputs.advantages, eps_low, eps_high)


def cispo(inputs: PolicyInputs, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-sg(clip(r)) A log p: the clipped weight is a constant, so every token keeps a gradient."""
    ratio = token_ratio(inputs)
    weight = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    clipped = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)  # weight capped, gradient kept
    return -weight * inputs.advantages * torch.where(inputs.mask, inputs.logprobs, 0.0), clipped


def sft(inputs: PolicyInputs, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of the response tokens."""
    return -torch.where(inputs.mask, inputs.logprobs, 0.0), torch.zeros_like(inputs.mask)


LOSSES: dict[str, Variant] = {
    "grpo": Variant(ppo_clip, Normalise.SEQUENCE, 0.2, 0.2),
    "dr_grpo": Variant(ppo_clip, Normalise.BUDGET, 0.2, 0.2, scale_advantages_by_std=False),
    "dapo": Variant(ppo_clip, Normalise.TOKEN, 0.2, 0.28),
    "gspo": Variant(gspo, Normalise.SEQUENCE, 3e-4, 4e-4),
    # MiniMax-M1 sets no lower bound on the weight (eps_low 1 clips at 0) and tunes the upper one;
    # 0.28 is verl's and Trinity-RFT's default.
    "cispo": Variant(cispo, Normalise.TOKEN, 1.0, 0.28),
    "sft": Variant(sft, Normalise.TOKEN, 0.0, 0.0, policy_gradient=False),
}


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log p_ref: unbiased for KL(p || ref), can be negative per token."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(ref - p) - (ref - p) - 1 (Schulman): unbiased and never negative."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def choose(field: str, value: object, options: dict[str, object]) -> None:
    """Refuse a name that is not a key of `options`, naming the field."""
    if value not in options:
        raise ValueError(f"{field}: got {value!r}; expected one of {', '.join(map(repr, options))}")


def check_settings(settings: LossSettings) -> None:
    """Refuse a loss or KL estimator these registries lack, naming the spec field. The schema
    (kubeforge.algorithm) holds them as plain names, since it may not import torch; the trainer
    calls this when it starts, so that a wrong name fails the job before its first step."""
    choose("spec.algorithm.loss", settings.loss, LOSSES)
    choose("spec.algorithm.klEstimator", settings.kl_estimator, KL_ESTIMATORS)


DEFAULT_SETTINGS = LossSettings()  # spec.algorithm's defaults (kubeforge.algorithm)


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    settings: LossSettings = DEFAULT_SETTINGS,
    norm: Normalisers | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss of `settings.loss` and detached metrics, each a token mean over `norm.tokens`.

    Args:
        logprobs: [B, T] log-probabilities of the taken tokens under the policy being trained.
        behaviour_logprobs: [B, T] the same, as reported by the generator that sampled them.
        advantages: [B] per sequence or [B, T] per token.
        mask: [B, T], true on response tokens; everything else is ignored.
        ref_logprobs: [B, T] under the reference model: the KL penalty and the `kl` metric.
        norm: the whole batch's counts; default this call's own (one process, one pass).

    Without TIS the ratio is new / behaviour. With `tis_cap` C the ratio is new / sg(new), whose
    value is 1 (one optimizer step per batch: the trainer's weights before the step are the "old"
    policy), and each token's term is multiplied by the detached min(exp(sg(new) - behaviour), C).

    Metrics: `ratio_mean` (trainer / generator, exp(new - behaviour)), `clip_fraction` (tokens
    whose gradient the variant's clip removed or, for CISPO, whose weight it capped), with TIS
    `tis_clip_fraction` (tokens whose weight hit C), with a reference `kl`.
    """
    choose("spec.algorithm.loss", settings.loss, LOSSES)
    variant = LOSSES[settings.loss]
    mask = mask.bool()
    norm = norm or Normalisers.of(mask)
    dtype = logprobs.dtype
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)

    def token_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, 0.0).sum() / norm.tokens

    mismatch = torch.exp(torch.where(mask, logprobs.detach() - behaviour_logprobs, 0.0))
    metrics = {"ratio_mean": token_mean(mismatch)}
    old = logprobs.detach() if settings.tis_cap else behaviour_logprobs
    eps_low = variant.clip_eps_low if settings.clip_eps_low is None else settings.clip_eps_low
    eps_high = variant.clip_eps_high if settings.clip_eps_high is None else settings.clip_eps_high
    per_token, clipped = variant.fn(PolicyInputs(logprobs, old, advantages, mask), eps_low, eps_high)
    metrics["clip_fraction"] = token_mean(clipped.to(dtype))
    if variant.policy_gradient and settings.tis_cap:
        per_token = per_token * mismatch.clamp(max=settings.tis_cap)
        metrics["tis_clip_fraction"] = token_mean((mismatch > settings.tis_cap).to(dtype))
    if ref_logprobs is not None and variant.policy_gradient:
        choose("spec.algorithm.klEstimator", settings.kl_estimator, KL_ESTIMATORS)
        kl = KL_ESTIMATORS[settings.kl_estimator](logprobs, torch.where(mask, ref_logprobs, logprobs.detach()))
        metrics["kl"] = token_mean(kl.detach())
        if settings.kl_coef:
            per_token = per_token + settings.kl_coef * kl
    per_token = torch.where(mask, per_token, 0.0)
    match variant.normalise:
        case Normalise.TOKEN:
            loss = per_token.sum() / norm.tokens
        case Normalise.SEQUENCE:
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm.sequences
        case Normalise.BUDGET:
            loss = per_token.sum() / (norm.max_length * norm.sequences)
    return loss, metrics
