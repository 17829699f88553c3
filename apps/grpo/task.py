"""The example task: copy a short string. Synthetic, seeded, with a train and a held-out split.

The tiny random model starts near zero reward; the partial-credit correctness reward and the
format reward (letters of the task's alphabet) give it signal from the first step.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message
    answer: str


class Task(Protocol):
    """What the GRPO loop needs of a task: training examples by stream position, a held-out split."""

    name: str  # the reward role's task name
    held_out: list[Example]
    max_new_tokens: int  # room for an answer, and to overrun it

    def at(self, position: int, stream: str = "rl") -> Example: ...


class CopyTask:
    name = "copy"

    def __init__(self, *, seed: int = 0, alphabet: str = "abcde", length: int = 3, held_out: int = 32):
        self.length = length
        every = ["".join(chars) for chars in itertools.product(alphabet, repeat=length)]
        random.Random(seed).shuffle(every)
        # Held-out strings never appear in training prompts.
        self.held_out = [self._example(w) for w in every[:held_out]]
        self.train = [self._example(w) for w in every[held_out:]]
        if not self.train:
            raise ValueError(f"task: {len(every)} distinct strings leave none for training after {held_out} held out")
        self.seed = seed
        self.max_new_tokens = length + 2  # the answer, then room to stop or overrun

    @staticmethod
    def _example(word: str) -> Example:
        return Example(prompt=word, answer=word)

    def at(self, position: int, stream: str = "rl") -> Example:
        """The training example at `position` of a seeded stream: the same on every run and resume."""
        return random.Random(f"{self.seed}/{stream}/{position}").choice(self.train)
