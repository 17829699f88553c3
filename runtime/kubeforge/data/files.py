"""Local JSONL and Parquet data sets, one split at a time, read with `datasets` (never downloaded).

`spec.dataset.path` is one file, whose only split is "train", or a directory with one file (or
shards) per split: `train.jsonl`, `test.parquet`, `train-00000-of-00002.parquet` (the Hugging Face
layout). A split may be sliced as `datasets` slices it: `train[:90%]`, `train[90%:]`, `test[:200]`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> `datasets` builder


def split_name(split: str) -> str:
    """ "train[:90%]" -> "train": the split a slice is taken from."""
    return re.sub(r"\[.*\]$", "", split)


def split_files(path: str | Path, split: str = "train") -> list[Path]:
    """The files that hold `split` (see the module), checked: they exist, and are all JSONL or all Parquet."""
    path, name = Path(path), split_name(split)
    if not path.exists():
        raise FileNotFoundError(
            f"spec.dataset.path: {path} does not exist; expected a JSONL or Parquet file, "
            f"or a directory holding {name}.jsonl or {name}.parquet"
        )
    if path.is_file():
        if path.suffix not in FORMATS:
            raise ValueError(f"spec.dataset.path: {path} is not JSONL or Parquet; expected a name ending in "
                             f"{', '.join(FORMATS)}")  # fmt: skip
        if name != "train":
            raise ValueError(
                f"spec.dataset: split {split!r}: the file {path} holds only the split 'train'; use slices "
                "(split: train[:90%], evalSplit: train[90%:]) or a directory with one file per split"
            )
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix in FORMATS and (p.stem == name or p.stem.startswith(f"{name}-"))
    )
    if not files:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"spec.dataset: no file for split {name!r} in {path} (it holds {present}); "
            f"expected {name}.jsonl, {name}.parquet or shards {name}-*.parquet"
        )
    if len({FORMATS[p.suffix] for p in files}) > 1:
        raise ValueError(f"spec.dataset: split {name!r} in {path} mixes JSONL and Parquet files; keep one format")
    return files


def load_table(path: str | Path, split: str = "train") -> Any:
    """One split (or slice of it) as a `datasets.Dataset`, rows in file order."""
    import datasets  # the runtime extra; the operator never loads data

    files = split_files(path, split)
    name = split_name(split)
    try:
        return datasets.load_dataset(FORMATS[files[0].suffix], data_files={name: [str(f) for f in files]}, split=split)
    except Exception as e:  # the library's messages about broken files do not say which setting to fix
        raise ValueError(f"spec.dataset: split {split!r} of {path} is not readable: {type(e).__name__}: {e}") from e
