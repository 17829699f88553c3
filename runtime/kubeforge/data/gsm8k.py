"""GSM8K-style math word problems from local JSONL or Parquet files (see kubeforge.data.files).

Each row has `question` and `answer`, where the answer is the worked solution followed by
`#### <final answer>` (the GSM8K format); other columns are ignored. The held-out split is either a
named split (`spec.dataset.evalSplit`: another file, or a slice) or a deterministic fraction of the
train split, chosen by a hash of each question and a seed: the same on every run and machine,
independent of row order, and a question that appears twice lands on one side only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubeforge.data.files import load_table

log = logging.getLogger("kubeforge.data")

COLUMNS = ("question", "answer")
SEPARATOR = "####"


@dataclass(frozen=True)
class Example:
    prompt: str  # the question, as written in the data
    answer: str  # the final answer: the text after '####'


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    held_out: list[Example]


def load_gsm8k(path: str | Path, split: str = "train") -> list[Example]:
    """The examples of one split, in file order; clear errors for missing files, columns or '####'."""
    table = load_table(path, split)
    where = f"{path} ({split})"
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"spec.dataset.path: {where} has no column {missing[0]!r} (it has {', '.join(table.column_names)}); "
            "expected GSM8K columns 'question' and 'answer'"
        )
    examples = []
    for i, (question, answer) in enumerate(zip(table["question"], table["answer"], strict=True)):
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"spec.dataset.path: {where} row {i}: 'question' is {question!r}; expected text")
        final = answer.rpartition(SEPARATOR)[2].strip() if isinstance(answer, str) and SEPARATOR in answer else ""
        if not final:
            raise ValueError(
                f"spec.dataset.path: {where} row {i}: 'answer' is {str(answer)[-80:]!r}; expected GSM8K format, "
                "the solution then '#### <final answer>'"
            )
        examples.append(Example(prompt=question, answer=final))
    if not examples:
        raise ValueError(f"spec.dataset.path: {where} has no rows")
    return examples


def _held_out(question: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\0{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def held_out_split(examples: Sequence[Example], fraction: float, seed: int = 0) -> Splits:
    """About `fraction` of the examples held out, by a seeded hash of each question (see the module)."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction: got {fraction!r}; expected a number between 0 and 1 (exclusive)")
    splits = Splits(train=[], held_out=[])
    for example in examples:
        (splits.held_out if _held_out(example.prompt, fraction, seed) else splits.train).append(example)
    for name, part in (("held-out", splits.held_out), ("train", splits.train)):
        if not part:
            raise ValueError(
                f"held-out fraction {fraction:g} of {len(examples)} examples leaves the {name} split empty; "
                "change the fraction, add data, or name a held-out split file (spec.dataset.evalSplit)"
            )
    return splits


def load_splits(
    path: str | Path,
    *,
    split: str = "train",
    eval_split: str | None = None,
    held_out_fraction: float = 0.05,
    seed: int = 0,
) -> Splits:
    """Train and held-out examples: the named `eval_split` when given, else a seeded fraction of `split`."""
    if eval_split is None:
        return held_out_split(load_gsm8k(path, split), held_out_fraction, seed)
    splits = Splits(train=load_gsm8k(path, split), held_out=load_gsm8k(path, eval_split))
    seen = {e.prompt for e in splits.train}
    leaked = sum(e.prompt in seen for e in splits.held_out)
    if leaked:  # a warning, not an error: public benchmarks do share a few questions between splits
        log.warning(
            "%d of %d held-out questions (%s) are also in the train split (%s); for slices of one file use "
            "split: train[:90%%], evalSplit: train[90%%:]",
            leaked, len(splits.held_out), eval_split, split,
        )  # fmt: skip
    return splits
