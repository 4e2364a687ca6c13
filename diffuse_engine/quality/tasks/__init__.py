"""Tasks with exact checkers (and a text corpus) for training and evaluating tiny diffusion models."""

from __future__ import annotations

from .addition import Addition
from .base import TEST_SEED, VALIDATION_SEED, Example, Task
from .countdown import Countdown3
from .sorting import Sorting
from .sudoku import Sudoku4x4
from .text import TextCorpus

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Addition, Sudoku4x4, Countdown3, Sorting)}
CORPORA: dict[str, type[TextCorpus]] = {TextCorpus.name: TextCorpus}


def get_task(name: str) -> Task | TextCorpus:
    """A fresh instance of the task or corpus called ``name``."""
    if name in TASKS:
        return TASKS[name]()
    if name in CORPORA:
        return CORPORA[name]()
    raise ValueError(f"unknown task {name!r}; available: {', '.join([*TASKS, *CORPORA])}.")


__all__ = ["CORPORA", "TASKS", "TEST_SEED", "VALIDATION_SEED", "Addition", "Countdown3", "Example", "Sorting",
           "Sudoku4x4", "Task", "TextCorpus", "get_task"]
