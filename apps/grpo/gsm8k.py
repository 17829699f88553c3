"""GSM8K-style math word problems as a GRPO task: local files (kubeforge.data), answers in \\boxed{}.

Pick it with `spec.dataset.path` and score it with the `math` reward (and `math_format`, for the
habit of boxing the answer):

    dataset: {path: data/gsm8k, split: train, evalSplit: test}    # a directory with train.* and test.* files
    # or one file: {path: gsm8k.jsonl, split: "train[:95%]", evalSplit: "train[95%:]"}, or no evalSplit:
    algorithm:
      heldOutFraction: 0.05     # without evalSplit: this share of the train split is held out (by seed)
      evalSize: 200             # optional: score only the first N held-out problems at each evaluation
      rewards: [{name: math, weight: 1.0}, {name: math_format, weight: 0.1}]
"""

from __future__ import annotations

import random
from pathlib import Path

from kubeforge import data
from kubeforge.spec import RLJobSpec

from apps.grpo.task import Example

PROMPT = (
    "{question}\n\nSolve the problem step by step. Then give the final answer, a number alone, as \\boxed{{answer}}."
)


def format_prompt(question: str) -> str:
    """The user message for one problem: the question and how to state the answer (the `math` reward's rule 1)."""
    return PROMPT.format(question=question.strip())


class GSM8KTask:
    """The GRPO loop's task (apps.grpo.task.Task) over GSM8K-style files: formatted prompts, final answers."""

    name = "gsm8k"

    def __init__(
        self,
        path: str | Path,
        *,
        split: str = "train",
        eval_split: str | None = None,
        held_out_fraction: float = 0.05,
        eval_size: int | None = None,
        seed: int = 0,
        max_new_tokens: int = 512,
    ):
        splits = data.load_splits(
            path, split=split, eval_split=eval_split, held_out_fraction=held_out_fraction, seed=seed
        )
        self.train = [Example(prompt=format_prompt(e.prompt), answer=e.answer) for e in splits.train]
        self.held_out = [Example(prompt=format_prompt(e.prompt), answer=e.answer) for e in splits.held_out]
        if eval_size is not None:
            self.held_out = self.held_out[:eval_size]
        self.seed = seed
        self.max_new_tokens = max_new_tokens  # worked solutions run to a few hundred tokens
        self._orders: dict[str, tuple[int, list[int]]] = {}  # stream -> (epoch, its permutation)

    @classmethod
    def from_spec(cls, spec: RLJobSpec, *, seed: int = 0) -> GSM8KTask:
        """The task a job's spec asks for: spec.dataset, plus algorithm.heldOutFraction and algorithm.evalSize."""
        if not spec.dataset.path:
            raise ValueError("spec.dataset.path: not set; expected a GSM8K-style JSONL or Parquet file or directory")
        return cls(
            spec.dataset.path,
            split=spec.dataset.split,
            eval_split=spec.dataset.eval_split,
            held_out_fraction=spec.algorithm.held_out_fraction,
            eval_size=spec.algorithm.eval_size,
            seed=seed,
        )

    def at(self, position: int, stream: str = "rl") -> Example:
        """The training example at `position` of a seeded stream: epochs of the train split, each in its
        own seeded order, so every problem comes once per epoch, the same on every run and resume."""
        epoch, index = divmod(position, len(self.train))
        cached = self._orders.get(stream)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.train)))
            random.Random(f"{self.seed}/{stream}/{epoch}").shuffle(order)
            cached = self._orders[stream] = (epoch, order)
        return self.train[cached[1][index]]
