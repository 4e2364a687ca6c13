"""What a task is: a seeded generator of prompt -> answer examples with an exact checker, or a text corpus.

Every reasoning task draws its held-out sets from fixed seeds, and the training stream skips any example whose
prompt is held out, so test, validation and training data are disjoint by construction (and checked by a test).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

TEST_SEED = 1_000_003
VALIDATION_SEED = 2_000_003


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt and its reference answer (the checker may accept other answers too)."""

    prompt: str
    answer: str


class Task(ABC):
    """A prompt -> answer task with an exact checker.

    ``gen_length`` is the answer canvas: every answer fits in it, and training pads answers to it with EOS,
    as LLaDA's supervised fine-tuning does. ``block_length`` is the block size the task is trained and
    evaluated with by default.
    """

    name: str = ""
    description: str = ""
    gen_length: int = 0
    block_length: int = 0
    test_size: int = 1000
    validation_size: int = 256

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """One example drawn with ``rng``."""

    @abstractmethod
    def check(self, prompt: str, output: str) -> bool:
        """Whether ``output`` (the generated text, EOS removed) is a correct answer to ``prompt``."""

    # ---------------------------------------------------------------- held-out sets
    def _unique(self, seed: int, n: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
        rng, seen, out = random.Random(seed), set(exclude), []
        for _ in range(200 * n):
            ex = self.sample(rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
                if len(out) == n:
                    return out
        raise RuntimeError(f"task {self.name!r} could not draw {n} distinct prompts.")

    def test_set(self, limit: int | None = None) -> list[Example]:
        """The fixed held-out test set (``test_size`` distinct prompts), or its first ``limit`` examples."""
        cached = getattr(self, "_test_cache", None)
        if cached is None:
            cached = self._unique(TEST_SEED, self.test_size)
            self._test_cache = cached
        return cached if limit is None else cached[:limit]

    def validation_set(self, limit: int | None = None) -> list[Example]:
        """A second held-out set, disjoint from the test set, for monitoring during training."""
        cached = getattr(self, "_val_cache", None)
        if cached is None:
            cached = self._unique(VALIDATION_SEED, self.validation_size,
                                  frozenset(e.prompt for e in self.test_set()))
            self._val_cache = cached
        return cached if limit is None else cached[:limit]

    def held_out_prompts(self) -> frozenset[str]:
        return frozenset(e.prompt for e in (*self.test_set(), *self.validation_set()))

    def train_stream(self, seed: int) -> Iterator[Example]:
        """Endless training examples from ``seed``; prompts of the test and validation sets never appear."""
        rng, held_out = random.Random(seed), self.held_out_prompts()
        while True:
            ex = self.sample(rng)
            if ex.prompt not in held_out:
                yield ex

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, gen_length={self.gen_length})"
