"""The training batch: what the controller sends the trainer for one step, and its wire form.

Rows are whole sequences, prompt then response, right-padded to a common length. Per-token
tensors are aligned with `input_ids`: `response_mask[b, t]` says token t was sampled by the
policy and is trained on, `behaviour_logprobs[b, t]` is the generator's log-probability of that
token (predicted at position t - 1, so position 0 is never a response token).

A row may pack several sequences (supervised fine-tuning): `position_ids[b, t]` then restarts at
0 where each sequence starts, and the trainer lets no token attend across that boundary.

On the wire a batch is a safetensors file (`encode` / `decode`): the tensors by name, plus JSON
under the metadata key "kubeforge.batch" (format version, free-form `info` such as the
controller's step). No JSON lists of numbers anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load, save

CONTENT_TYPE = "application/vnd.kubeforge.batch+safetensors"
FORMAT = "kubeforge.batch/v1"
METADATA_KEY = "kubeforge.batch"

# name -> dtype on the wire (and in memory)
DTYPES = {
    "input_ids": torch.int64,
    "response_mask": torch.bool,
    "behaviour_logprobs": torch.float32,
    "advantages": torch.float32,
    "policy_versions": torch.int64,
    "ref_logprobs": torch.float32,
    "position_ids": torch.int64,
}


class BatchError(ValueError):
    """A batch that cannot be trained on; the message says which tensor and why."""


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, T] int64
    response_mask: torch.Tensor  # [B, T] bool
    behaviour_logprobs: torch.Tensor  # [B, T] float32, 0 outside the response
    advantages: torch.Tensor  # [B] per sequence, or [B, T] per token; float32
    policy_versions: torch.Tensor  # [B] int64: the policy version that generated each row
    ref_logprobs: torch.Tensor | None = None  # [B, T] float32, for a KL penalty
    position_ids: torch.Tensor | None = None  # [B, T] int64, packed rows: 0 where each sequence starts
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, dtype in DTYPES.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, torch.as_tensor(value).to(dtype))
        self._validate()

    def _validate(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise BatchError(
                f"input_ids: got shape {tuple(self.input_ids.shape)}; expected [rows, length] with rows > 0"
            )
        rows, length = self.input_ids.shape
        expected = {
            "response_mask": [(rows, length)],
            "behaviour_logprobs": [(rows, length)],
            "advantages": [(rows,), (rows, length)],
            "policy_versions": [(rows,)],
            "ref_logprobs": [(rows, length)],
            "position_ids": [(rows, length)],
        }
        for name, shapes in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) not in shapes:
                raise BatchError(f"{name}: got shape {tuple(value.shape)}; expected {' or '.join(map(str, shapes))}")
        if self.response_mask[:, 0].any():
            raise BatchError("response_mask: position 0 is set; a response token needs a token before it")
        if self.position_ids is not None:
            self._validate_positions()
        if not torch.isfinite(self.advantages).all():
            raise BatchError("advantages: not all finite")
        if not torch.isfinite(self.behaviour_logprobs[self.response_mask]).all():
            raise BatchError("behaviour_logprobs: not finite on every response token")

    def _validate_positions(self) -> None:
        positions = self.position_ids
        if positions[:, 0].any():
            raise BatchError("position_ids: every row must start at position 0")
        steps = positions[:, 1:]
        if not ((steps == positions[:, :-1] + 1) | (steps == 0)).all():
            raise BatchError("position_ids: each position must be the previous one + 1, or 0 where a sequence starts")
        if (self.response_mask & (positions == 0)).any():
            raise BatchError(
                "response_mask: set on a sequence's first token (position_ids 0); it has no token before it"
            )

    @classmethod
    def from_sequences(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]],
        advantages: Sequence[float],
        policy_versions: Sequence[int],
        *,
        pad_id: int = 0,
        info: dict[str, Any] | None = None,
    ) -> TrainBatch:
        """Rows of prompt + response token ids, right-padded, the response tokens trained on.

        `logprobs` are the generator's, one per response token; `policy_versions` the oldest
        version that sampled each response (the staleness check uses it).
        """
        length = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        rows = len(prompts)
        input_ids = torch.full((rows, length), pad_id, dtype=torch.int64)
        mask = torch.zeros(rows, length, dtype=torch.bool)
        behaviour = torch.zeros(rows, length, dtype=torch.float32)
        for row, (prompt, response, lps) in enumerate(zip(prompts, responses, logprobs, strict=True)):
            if len(lps) != len(response):
                raise BatchError(f"row {row}: {len(response)} response tokens but {len(lps)} logprobs")
            start, end = len(prompt), len(prompt) + len(response)
            input_ids[row, :end] = torch.tensor([*prompt, *response], dtype=torch.int64)
            mask[row, start:end] = True
            behaviour[row, start:end] = torch.tensor(lps, dtype=torch.float32)
        return cls(
            input_ids=input_ids,
            response_mask=mask,
            behaviour_logprobs=behaviour,
            advantages=torch.tensor(advantages, dtype=torch.float32),
            policy_versions=torch.tensor(policy_versions, dtype=torch.int64),
            info=info or {},
        )

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Response tokens: the loss's normaliser."""
        return int(self.response_mask.sum())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in DTYPES if getattr(self, name) is not None}

    def select(self, rows: torch.Tensor | slice) -> TrainBatch:
        """The batch restricted to some rows (a rank's shard, a micro-batch)."""
        return TrainBatch(**{name: value[rows] for name, value in self.tensors().items()}, info=self.info)

    def truncate(self, length: int) -> TrainBatch:
        """The first `length` positions of every row."""
        cut = {name: value[:, :length] if value.dim() == 2 else value for name, value in self.tensors().items()}
        return TrainBatch(**cut, info=self.info)

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(**{name: value.to(device) for name, value in self.tensors().items()}, info=self.info)

    def encode(self) -> bytes:
        tensors = {name: value.contiguous() for name, value in self.tensors().items()}
        metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "info": self.info})}
        return save(tensors, metadata=metadata)

    @classmethod
    def decode(cls, data: bytes) -> TrainBatch:
        """Read a batch from its wire form; BatchError says what is wrong with a bad one."""
        try:
            tensors = load(data)
            header = json.loads(_metadata(data).get(METADATA_KEY, "null"))
        except Exception as e:  # safetensors raises its own error types for a bad header or truncated data
            raise BatchError(f"not a safetensors batch: {e}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise BatchError(f"metadata {METADATA_KEY!r}: got {header!r}; expected format {FORMAT!r}")
        unknown = set(tensors) - set(DTYPES)
        missing = {"input_ids", "response_mask", "behaviour_logprobs", "advantages", "policy_versions"} - set(tensors)
        if unknown or missing:
            raise BatchError(f"tensors: unknown {sorted(unknown)}, missing {sorted(missing)}")
        for name, value in tensors.items():
            if value.dtype != DTYPES[name]:
                raise BatchError(f"{name}: got dtype {value.dtype}; expected {DTYPES[name]}")
        batch = cls(**tensors, info=header.get("info") or {})
        if not batch.num_tokens:
            raise BatchError("response_mask: no response tokens; nothing to train on")
        return batch


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (safetensors.torch.load does not return it)."""
    header_size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
