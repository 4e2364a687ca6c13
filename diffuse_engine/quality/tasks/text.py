"""Character-level text: the prose of ``pydoc_data.topics`` (the help topics shipped with CPython, about 465k
characters), split by topic into training text and held-out text. Some passages are repeated across topics, so
every training paragraph that shares a line of 20 or more characters with the held-out text is dropped: no
held-out passage is ever trained on."""

from __future__ import annotations

import functools

HELD_OUT_EVERY = 10  # every 10th topic (sorted by name, starting at the 6th) is held out
HELD_OUT_OFFSET = 5


class TextCorpus:
    name = "text-char"
    description = "pydoc_data.topics prose, split by topic (every 10th topic held out)"
    seq_len = 128

    @functools.cached_property
    def topics(self) -> dict[str, str]:
        from pydoc_data.topics import topics

        return dict(sorted(topics.items()))

    def held_out_topics(self) -> list[str]:
        names = list(self.topics)
        return names[HELD_OUT_OFFSET::HELD_OUT_EVERY]

    def train_topics(self) -> list[str]:
        held = set(self.held_out_topics())
        return [n for n in self.topics if n not in held]

    @functools.cached_property
    def _train_text(self) -> str:
        held_lines = {line.strip() for line in self.held_out_text().splitlines() if len(line.strip()) >= 20}
        kept = []
        for name in self.train_topics():
            paragraphs = self.topics[name].split("\n\n")
            kept.append("\n\n".join(p for p in paragraphs
                                     if not any(line.strip() in held_lines for line in p.splitlines())))
        return "\n".join(kept)

    def train_text(self) -> str:
        """The training topics without the paragraphs they share with the held-out topics."""
        return self._train_text

    def held_out_text(self) -> str:
        return "\n".join(self.topics[n] for n in self.held_out_topics())

    def __repr__(self) -> str:
        return f"TextCorpus(name={self.name!r})"
