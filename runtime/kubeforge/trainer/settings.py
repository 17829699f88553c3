"""The trainer's knobs, read from the job's free-form `spec.algorithm` (camelCase keys, as in YAML).

Keys the trainer does not know belong to the app (group size, rewards, ...) and are left alone.
"""

from __future__ import annotations

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
