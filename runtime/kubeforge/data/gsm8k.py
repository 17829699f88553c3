"""GSM8K-style math word problems from local JSONL or Parquet files.

Each row has `question` and `answer`, where the answer is the worked solution followed by
`#### <final answer>` (the GSM8K format); other columns are ignored. `spec.dataset.path` is one file,
or a directory holding one file (or shards) per split: `train.jsonl`, `test.parquet`,
`train-00000-of-00001.parquet` (the Hugging Face layout). The held-out split is either a named split
(`spec.dataset.evalSplit`) or a deterministic fraction of the train split, chosen by a hash of each
question and a seed: the same on every run and machine, independent of row order, and a question
that appears twice lands on one side only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> `datasets` builder
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


def _split_files(path: Path, split: str) -> list[Path]:
    """The files of `split`: the path itself when it is a file, else `{split}.*` or `{split}-*.*` shards in it."""
    if not path.exists():
        raise FileNotFoundError(
            f"spec.dataset.path: {path} does not exist; expected a JSONL or Parquet file, "
            f"or a directory holding {split}.jsonl or {split}.parquet"
        )
    if path.is_file():
        if path.suffix not in FORMATS:
            raise ValueError(f"spec.dataset.path: {path} is not JSONL or Parquet; expected a name ending in "
                             f"{', '.join(FORMATS)}")  # fmt: skip
        files = [path]
    else:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in FORMATS and (p.stem == split or p.stem.startswith(f"{split}-"))
        )
        if not files:
            present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise FileNotFoundError(
                f"spec.dataset: no file for split {split!r} in {path} (it holds {present}); "
                f"expected {split}.jsonl, {split}.parquet or shards {split}-*.parquet"
            )
    if len({FORMATS[p.suffix] for p in files}) > 1:
        raise ValueError(f"spec.dataset: split {split!r} in {path} mixes JSONL and Parquet files; keep one format")
    return files


def load_gsm8k(path: str | Path, split: str = "train") -> list[Example]:
    """The examples of one split, in file order; clear errors for missing files, columns or '####'."""
    import datasets  # the runtime extra; the operator never loads data

    files = _split_files(Path(path), split)
    where = files[0] if len(files) == 1 else f"{files[0].parent} ({split} split)"
    builder = FORMATS[files[0].suffix]
    try:
        table = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # the library's messages about broken files do not say which setting to fix
        raise ValueError(f"spec.dataset.path: {where} is not readable {builder}: {type(e).__name__}: {e}") from e
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
    if Path(path).is_file():
        raise ValueError(
            f"spec.dataset.evalSplit: {eval_split!r} needs spec.dataset.path to be a directory of split files, "
            f"but {path} is one file; drop evalSplit to hold out a fraction of it"
        )
    return Splits(train=load_gsm8k(path, split), held_out=load_gsm8k(path, eval_split))
