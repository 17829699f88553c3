"""SFT data: local JSONL or Parquet rows -> chat-templated token ids with a loss mask -> packed rows.

Splits are read by kubeforge.data.files (a file, or a directory with a file per split; slices).
Two row formats:
- chat: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}; every
  assistant turn is trained on.
- prompt/completion: {"prompt": "...", "completion": "..."}; each may also be a list of messages.
  It becomes a user turn then an assistant turn; only the completion is trained on.

The whole conversation is rendered once with the tokenizer's chat template; a trained turn's
tokens are those overlapping its content, plus the one token after it (the template's end of
turn, e.g. <|im_end|>, <|eot_id|>), so the model learns to stop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubeforge.batch import TrainBatch
from kubeforge.data.files import load_table


class DataError(ValueError):
    """Data the app cannot use; the message names the spec field or the row and says what to fix."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    mask: list[bool]  # True on the tokens the loss is taken on (never the first)

    @property
    def trained(self) -> int:
        return sum(self.mask)


def conversation(row: dict[str, Any], index: int) -> tuple[list[dict[str, str]], list[bool]]:
    """The row's messages and, per message, whether it is trained on."""

    def as_messages(value: Any, role: str, field: str) -> list[dict[str, str]]:
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
            return [{"role": m["role"], "content": m["content"]} for m in value]
        raise DataError(f"row {index}: {field} must be a string or a list of {{role, content}} messages")

    if row.get("messages") is not None:
        if not isinstance(row["messages"], list):
            raise DataError(f"row {index}: messages must be a list of {{role, content}} messages")
        messages = as_messages(row["messages"], "assistant", "messages")
        return messages, [m["role"] == "assistant" for m in messages]
    if row.get("prompt") is not None and row.get("completion") is not None:
        prompt = as_messages(row["prompt"], "user", "prompt")
        completion = as_messages(row["completion"], "assistant", "completion")
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    raise DataError(f"row {index}: expected a 'messages' column (chat) or 'prompt' and 'completion' columns")


def tokenize(tokenizer: Any, messages: list[dict[str, str]], trained: list[bool], index: int) -> Example:
    """Render with the chat template; mask = tokens overlapping each trained turn's content, plus one after."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    mask = [False] * len(ids)
    cursor = 0
    for message, train in zip(messages, trained, strict=True):
        content = message["content"].strip()  # templates such as Llama 3's trim each turn
        start = text.find(content, cursor)
        if start < 0:
            raise DataError(f"row {index}: the chat template does not render a {message['role']} turn's content as is")
        end = cursor = start + len(content)
        if not train:
            continue
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if inside and inside[-1] + 1 < len(ids):
            inside.append(inside[-1] + 1)  # the end-of-turn token
        for i in inside:
            mask[i] = i > 0
    return Example(ids, mask)


def tokenize_split(dataset: Iterable[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """Every row as an Example cut to `max_length` tokens; rows left without trained tokens are dropped.
    Returns the examples and how many rows were cut."""
    examples, cut = [], 0
    for index, row in enumerate(dataset):
        example = tokenize(tokenizer, *conversation(row, index), index)
        if len(example.input_ids) > max_length:
            cut += 1
            example = Example(example.input_ids[:max_length], example.mask[:max_length])
        if example.trained:
            examples.append(example)
    if not examples:
        raise DataError("the split has no example with a trained token (assistant turn or completion)")
    return examples, cut


def load_examples(path: str | None, split: str, tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """`tokenize_split` of one split of spec.dataset.path (kubeforge.data.files: a file, or a directory
    with a file or shards per split; slices such as train[:95%])."""
    if not path:
        raise DataError("spec.dataset.path: not set; SFT reads a local JSONL or Parquet file, or a directory of them")
    return tokenize_split(load_table(path, split), tokenizer, max_length)


def pack(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Rows of whole examples, each at most `max_length` tokens, in order: an example that does not
    fit in the current row starts the next one (so every example is trained exactly once)."""
    rows: list[list[Example]] = []
    used = max_length
    for example in examples:
        if used + len(example.input_ids) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.input_ids)
    return rows


def to_batch(rows: Sequence[Sequence[Example]], *, pad_id: int, policy_version: int, step: int) -> TrainBatch:
    """Packed rows as a trainer batch for the `sft` loss: position ids restart at each example."""
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    positions = torch.zeros(len(rows), length, dtype=torch.int64)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            mask[r, at : at + n] = torch.tensor(example.mask)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(length - at)  # padding: a sequence of its own, never trained
    return TrainBatch(
        input_ids=input_ids,
        response_mask=mask,
        behaviour_logprobs=torch.zeros(len(rows), length),
        advantages=torch.zeros(len(rows)),
        policy_versions=torch.full((len(rows),), policy_version),
        position_ids=positions,
        info={"loss": "sft", "step": step},
    )


def epochs(examples: Sequence[Example], max_length: int, *, packed: bool, seed: int) -> Iterator[list[Example]]:
    """The training stream of rows, epoch after epoch, each epoch shuffled with its own seed."""
    epoch = 0
    while True:
        order = list(examples)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield from pack(order, max_length) if packed else ([e] for e in order)
        epoch += 1


# -- a synthetic task for the examples and tests: reverse a short string --------------------------

LETTERS = "abcde"


def synthetic_rows(count: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Chat rows asking to reverse 3 to 5 letters over "abcde" (none of `exclude`); every third one
    has a second turn."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < count:
        i = len(rows)
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if word in exclude:
            continue
        messages = [
            {"role": "system", "content": "reverse"},
            {"role": "user", "content": word},
            {"role": "assistant", "content": word[::-1]},
        ]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "again"}, {"role": "assistant", "content": word[::-1]}]
        rows.append({"messages": messages})
    return rows


def write_synthetic(out_dir: str | Path, *, train: int = 2000, test: int = 64, seed: int = 0) -> Path:
    """OUT_DIR/train.jsonl and OUT_DIR/test.jsonl of `synthetic_rows`; no test word is a train word."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = synthetic_rows(train, seed)
    seen = frozenset(row["messages"][1]["content"] for row in train_rows)
    for name, rows in (("train", train_rows), ("test", synthetic_rows(test, seed + 1, exclude=seen))):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


if __name__ == "__main__":
    import sys

    print(write_synthetic(sys.argv[1] if len(sys.argv) > 1 else "runs/data/sft-tiny"))
