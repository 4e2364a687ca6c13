"""Datasets of the shipped lm-evaluation-harness tasks, built from the engine's own task generators (no download):
the held-out test sets of ``addition`` and ``sudoku4x4`` in the order ``diffuse-engine eval`` uses, and a
four-way choice between continuations of held-out ``text-char`` prose."""

from __future__ import annotations

import random

import datasets

from diffuse_engine.quality.tasks import get_task

CHOICES = 4
CONTEXT_CHARS, CONTINUATION_CHARS = 48, 16


def _test_set(name: str, size: int | None = None) -> dict:
    examples = get_task(name).test_set(size)
    return {"test": datasets.Dataset.from_list([{"prompt": ex.prompt, "answer": ex.answer} for ex in examples])}


def addition(**kwargs) -> dict:
    """The held-out sums, first 1000."""
    return _test_set("addition")


def sudoku4x4(**kwargs) -> dict:
    """The held-out puzzles, first 1000."""
    return _test_set("sudoku4x4")


def text_choice(size: int = 200, seed: int = 0, **kwargs) -> dict:
    """``size`` questions: 48 characters of held-out prose, then its true next 16 characters among 3 distractors
    (16-character spans from elsewhere in the held-out text); the gold index is drawn per question."""
    text = get_task("text-char").held_out_text().replace("\n", " ")
    rng = random.Random(seed)
    width = CONTEXT_CHARS + CONTINUATION_CHARS
    rows = []
    for _ in range(size):
        start = rng.randrange(len(text) - width)
        context, truth = text[start:start + CONTEXT_CHARS], text[start + CONTEXT_CHARS:start + width]
        others = []
        while len(others) < CHOICES - 1:
            s = rng.randrange(len(text) - CONTINUATION_CHARS)
            span = text[s:s + CONTINUATION_CHARS]
            if span != truth and span not in others:
                others.append(span)
        gold = rng.randrange(CHOICES)
        rows.append({"context": context, "choices": others[:gold] + [truth] + others[gold:], "gold": gold})
    return {"test": datasets.Dataset.from_list(rows)}
