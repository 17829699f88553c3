"""`spec.algorithm`: every key that any process of a job reads, typed, with its default.

The trainer, the reference replicas, the reward role and the apps (apps/grpo, apps/sft) all read
this one section, so it is one model: a key is declared once, with its type, its default and what
it does, and a key no reader knows is refused (`kubeforge validate`, the operator, `kubeforge run`:
all parse the spec through kubeforge.validation) with a "did you mean" instead of being ignored.

This module is part of the schema (kubeforge.spec imports it; the operator and the CRD are built
from it), so it must not import torch: names that live in the trainer's registries (the loss, the
KL estimator) are plain strings here, checked by the trainer when it starts
(kubeforge.losses.check_settings); reward names are checked by the reward role.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, WithJsonSchema

from kubeforge.schema import Model


class AlgorithmKeys(Model):
    """Base of the spec.algorithm models: the spec's (camelCase keys, unknown keys are errors), read-only."""

    model_config = ConfigDict(
        frozen=True,
        # The CRD types every key but keeps unknown ones (crd.structural): with a closed schema the
        # API server would prune a misspelt key silently (clients that do not ask for strict field
        # validation) or refuse it without a suggestion; kept, it reaches the operator, which
        # refuses it with the field path and a "did you mean" (kubeforge.validation.describe).
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class RewardWeight(AlgorithmKeys):
    """One reward function of the reward role, by its registered name (kubeforge.rewards.functions)."""

    name: str = Field(
        ...,
        description="A reward the reward role registers (kubeforge.rewards.functions): correctness, exact, format, "
        "math, math_format.",
    )
    weight: float = Field(1.0, description="Its weight in the sum that is the sample's reward.")


class LossSettings(AlgorithmKeys):
    """The keys the trainer's loss takes (kubeforge.losses.policy_loss); docs/algorithms.md gives the formulas."""

    loss: str = Field(
        "grpo",
        min_length=1,
        description="The loss variant, a name in the trainer's registry kubeforge.losses.LOSSES: grpo, dr_grpo, "
        "dapo, gspo, cispo, sft. A batch may name another for one step (info.loss).",
    )
    clip_eps_low: float | None = Field(
        None, ge=0, description="The ratio is clipped below at 1 - clipEpsLow; default: the loss variant's own."
    )
    clip_eps_high: float | None = Field(
        None, ge=0, description="The ratio is clipped above at 1 + clipEpsHigh; default: the loss variant's own."
    )
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of the KL penalty to the reference model (spec.roles.reference); 0: none."
    )
    kl_estimator: str = Field("k3", description="The KL estimator: k1 or k3 (kubeforge.losses.KL_ESTIMATORS).")
    tis_cap: float = Field(
        0.0,
        ge=0,
        description="Truncated importance sampling: cap C of the generator/trainer mismatch weight; 0: off.",
    )


# A pair in Python, an array of two numbers in the CRD: pydantic's schema for a tuple uses
# prefixItems, which a structural schema cannot express.
Betas = Annotated[
    tuple[float, float],
    WithJsonSchema({"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}),
]


# A share strictly between 0 and 1. The CRD gets inclusive bounds: OpenAPI v3.0 spells exclusive
# ones as booleans, which pydantic's JSON Schema (numbers) does not; the operator refuses 0 and 1.
Fraction = Annotated[float, Field(gt=0, lt=1), WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1})]


class Algorithm(LossSettings):
    """spec.algorithm: the loss, the optimizer, the loop of the app and the rewards, in one flat section."""

    # -- the trainer (and the reference replicas: temperature, microBatchSize) ------------------
    lr: float = Field(1e-6, description="Peak learning rate of AdamW.")
    betas: Betas = Field((0.9, 0.999), description="AdamW's betas.")
    weight_decay: float = Field(0.0, description="AdamW's weight decay.")
    adam_eps: float = Field(1e-8, description="AdamW's eps.")
    max_grad_norm: float = Field(1.0, description="Gradients are clipped to this global norm.")
    lr_warmup_steps: int = Field(
        0, ge=0, description="Trainer steps of linear warm-up from lr / lrWarmupSteps to lr (torchtitan's shape)."
    )
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="After the warm-up: constant, or a decay to lr * lrMinFactor one step after the last."
    )
    lr_min_factor: float = Field(0.0, ge=0, le=1, description="Where lrDecay ends, as a fraction of lr.")
    warmup_steps: int = Field(
        0,
        ge=0,
        description="apps/grpo: supervised steps on the train split before RL. The trainer counts them too: "
        "the learning-rate schedule spans them.",
    )
    temperature: float = Field(
        1.0,
        ge=0,
        description="Sampling temperature of the generators; the trainer and the reference divide the logits by it "
        "before the logprobs, so that theirs match the sampling.",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none",
        description="Activation memory against compute (torchtitan's apply_ac): full recomputes each block in the "
        "backward pass; selective keeps matmul and attention outputs and recomputes the rest.",
    )
    micro_batch_size: int = Field(
        0, ge=0, description="Rows per forward/backward pass on each trainer rank; 0: a rank's whole shard at once."
    )
    weight_sync_bucket_bytes: int = Field(
        # kubeforge.weight_sync's DEFAULT_BUCKET_BYTES, for the library's own callers; a test checks they agree.
        256 << 20,
        ge=1,
        description="Size of the flat buffers the weights travel to the generators in.",
    )

    # -- the apps' loops ------------------------------------------------------------------------
    seed: int = Field(0, description="Seed of the data stream (its order, each epoch's shuffle) and of sampling.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Steps between held-out evaluations; default: the app's own (apps/grpo 10, apps/sft 50).",
    )
    # apps/grpo
    prompts_per_step: int = Field(16, ge=1, description="apps/grpo: prompts per RL step.")
    group_size: int = Field(8, ge=1, description="apps/grpo: completions sampled per prompt; advantages are per group.")
    max_new_tokens: int = Field(0, ge=0, description="apps/grpo: most tokens per completion; 0: the task's own.")
    eval_samples: int = Field(
        1,
        ge=1,
        description="apps/grpo: samples per held-out prompt. 1: greedy; more are sampled at temperature and add "
        "pass@k (a sample passes when the first reward of rewards is 1).",
    )
    dynamic_sampling: bool = Field(False, description="apps/grpo (DAPO): train only on groups whose rewards differ.")
    held_out_fraction: Fraction = Field(
        0.05,
        description="apps/grpo, GSM8K-style data without spec.dataset.evalSplit: this share of the train split is "
        "held out (by seed).",
    )
    eval_size: int | None = Field(
        None, ge=1, description="apps/grpo, GSM8K-style data: score only the first N held-out problems; default: all."
    )
    # apps/sft
    max_length: int = Field(2048, ge=2, description="apps/sft: tokens per packed row; longer examples are cut.")
    rows_per_step: int = Field(8, ge=1, description="apps/sft: packed rows per optimizer step.")
    pack: bool = Field(True, description="apps/sft: several examples per row; false: one example per row.")
    eval_max_examples: int = Field(0, ge=0, description="apps/sft: held-out examples evaluated; 0: all.")
    export_every: int = Field(0, ge=0, description="apps/sft: HF export every N steps; 0: only at the end.")

    # -- the reward role ------------------------------------------------------------------------
    rewards: list[RewardWeight] = Field(
        default_factory=lambda: [RewardWeight(name="correctness")],
        min_length=1,
        description="The reward functions that score each completion, and their weights; the first is the "
        "correctness one that pass@k counts.",
    )

    def loss_settings(self, loss: str | None = None) -> LossSettings:
        """What the loss function takes; `loss` overrides the job's variant (a batch's info["loss"])."""
        return self.model_copy(update={"loss": loss}) if loss else self

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
