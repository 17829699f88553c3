"""The trainer's knobs, read from the job's free-form `spec.algorithm` (camelCase keys, as in YAML).

Keys the trainer does not know belong to the app (group size, rewards, ...) and are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pydantic.alias_generators import to_camel

from kubeforge.weight_sync import DEFAULT_BUCKET_BYTES


@dataclass(frozen=True)
class TrainerSettings:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    # Sampling temperature of the generator: logits are divided by it before the logprobs.
    temperature: float = 1.0
    # Rows per forward/backward pass on each rank; 0 takes a rank's whole shard at once.
    micro_batch_size: int = 0
    # Size of the flat buffers weights travel to the generators in.
    weight_sync_bucket_bytes: int = DEFAULT_BUCKET_BYTES

    @classmethod
    def from_algorithm(cls, algorithm: dict[str, Any]) -> TrainerSettings:
        """Pick this class's fields out of spec.algorithm; a wrong type is one clear error."""
        values = {}
        for f in fields(cls):
            key = to_camel(f.name)
            if key not in algorithm:
                continue
            value = algorithm[key]
            try:
                values[f.name] = tuple(float(v) for v in value) if f.name == "betas" else type(f.default)(value)
            except (TypeError, ValueError):
                raise ValueError(f"spec.algorithm.{key}: got {value!r}; expected {type(f.default).__name__}") from None
        return cls(**values)
