"""The example task: copy a short string. Synthetic, seeded, with a train and a held-out split.

The tiny random model starts near zero reward; the partial-credit correctness reward and the
format reward (letters of the task's alphabet) give it signal from the first step.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message
    answer: str


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
        self._rng = random.Random(seed + 1)

    @staticmethod
    def _example(word: str) -> Example:
        return Example(prompt=word, answer=word)

    def sample(self, count: int) -> list[Example]:
        """`count` training examples, drawn with the task's own seeded generator."""
        return [self._rng.choice(self.train) for _ in range(count)]
