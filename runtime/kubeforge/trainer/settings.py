"""The trainer's knobs, read from the job's free-form `spec.algorithm` (camelCase keys, as in YAML).

Keys the trainer does not know belong to the app (group size, rewards, ...) and are left alone.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from kubeforge.algorithm import AlgorithmSettings
from kubeforge.losses import KL_ESTIMATORS, LOSSES, LossSettings, choose
from kubeforge.weight_sync import DEFAULT_BUCKET_BYTES


class TrainerSettings(AlgorithmSettings):
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # The learning rate over the trainer's steps, shaped as torchtitan's: linear warm-up to `lr`
    # in lrWarmupSteps steps, then constant, or a decay to lr * lrMinFactor by the last step.
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    lr_min_factor: float = Field(0.0, ge=0, le=1)
    # The app's supervised steps before RL (apps/grpo): trainer steps too, so the schedule spans them.
    warmup_steps: int = Field(0, ge=0)
    # The loss variant (kubeforge.losses.LOSSES); a batch may name another in info["loss"].
    loss: str = "grpo"
    # None: the variant's own default (docs/algorithms.md).
    clip_eps_low: float | None = Field(None, ge=0)
    clip_eps_high: float | None = Field(None, ge=0)
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: str = "k3"
    # Truncated importance sampling: cap C of the generator/trainer mismatch weight; 0 is off.
    tis_cap: float = Field(0.0, ge=0)
    # Sampling temperature of the generator: logits are divided by it before the logprobs.
    temperature: float = 1.0
    # Activation memory against compute (torchtitan's modes): "full" recomputes each block in the
    # backward pass; "selective" keeps matmul and attention outputs and recomputes the rest.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # Rows per forward/backward pass on each rank; 0 takes a rank's whole shard at once.
    micro_batch_size: int = Field(0, ge=0)
    # Size of the flat buffers weights travel to the generators in.
    weight_sync_bucket_bytes: int = Field(DEFAULT_BUCKET_BYTES, ge=1)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        choose("spec.algorithm.loss", value, LOSSES)
        return value

    @field_validator("kl_estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        choose("spec.algorithm.klEstimator", value, KL_ESTIMATORS)
        return value

    def lr_at(self, step: int, rl_steps: int) -> float:
        """The learning rate of trainer step `step` (0 for the first) of a job of `rl_steps` RL steps.

        A pure function of the step: a resumed trainer continues the schedule with no state of its
        own, and steps past the planned end (a job extended on resume) keep the final rate.
        """
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        if self.lr_decay == "constant":
            return self.lr
        decay_steps = max(1, rl_steps + self.warmup_steps - self.lr_warmup_steps)
        progress = min(1.0, (step - self.lr_warmup_steps) / decay_steps)
        shape = 1 - progress if self.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.lr_min_factor + (1 - self.lr_min_factor) * shape)

    def loss_settings(self, loss: str | None = None) -> LossSettings:
        """What the loss function takes; `loss` overrides the job's variant (a batch's info["loss"])."""
        return LossSettings(
            loss=loss or self.loss,
            clip_eps_low=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            tis_cap=self.tis_cap,
        )
