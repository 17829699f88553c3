"""The trainer's knobs, read from the job's free-form `spec.algorithm` (camelCase keys, as in YAML).

Keys the trainer does not know belong to the app (group size, rewards, ...) and are left alone.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from pydantic.alias_generators import to_camel

from kubeforge.losses import KL_ESTIMATORS, LOSSES, LossSettings, choose
from kubeforge.weight_sync import DEFAULT_BUCKET_BYTES


@dataclass(frozen=True)
class TrainerSettings:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # The loss variant (kubeforge.losses.LOSSES); a batch may name another in info["loss"].
    loss: str = "grpo"
    # None: the variant's own default (docs/algorithms.md).
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    # Truncated importance sampling: cap C of the generator/trainer mismatch weight; 0 is off.
    tis_cap: float = 0.0
    # Sampling temperature of the generator: logits are divided by it before the logprobs.
    temperature: float = 1.0
    # Rows per forward/backward pass on each rank; 0 takes a rank's whole shard at once.
    micro_batch_size: int = 0
    # Size of the flat buffers weights travel to the generators in.
    weight_sync_bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self) -> None:
        choose("spec.algorithm.loss", self.loss, LOSSES)
        choose("spec.algorithm.klEstimator", self.kl_estimator, KL_ESTIMATORS)
        for name in ("clip_eps_low", "clip_eps_high", "kl_coef", "tis_cap"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"spec.algorithm.{to_camel(name)}: got {value!r}; expected a number >= 0")

    @classmethod
    def from_algorithm(cls, algorithm: dict[str, Any]) -> TrainerSettings:
        """Pick this class's fields out of spec.algorithm; a wrong type or name is one clear error."""
        hints = get_type_hints(cls)
        values = {}
        for f in fields(cls):
            key = to_camel(f.name)
            if key not in algorithm:
                continue
            value, kind = algorithm[key], hints[f.name]
            if isinstance(kind, types.UnionType):  # X | None: None is the default, a value is an X
                kind = next(k for k in kind.__args__ if k is not type(None))
            try:
                values[f.name] = tuple(float(v) for v in value) if f.name == "betas" else kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"spec.algorithm.{key}: got {value!r}; expected {kind.__name__}") from None
        return cls(**values)

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
