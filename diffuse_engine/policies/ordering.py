"""Confidence orderings: which still-masked positions a step commits first (``SamplingParams.remasking``).

An :class:`Ordering` is declarative: it names the statistic of the head that scores a candidate (its *source*)
under the fixed policy and under the adaptive policies (whose thresholds read a confidence), whether its
probability is the softmax of the raw logits (before temperature and filters), and the model families it is the
default of. The step computes each source once for the batch and gives every request the one of its ordering
(:func:`ordering_flags`), so one batch mixes every ordering. Plain standard library (no torch).

Sources: ``prob`` (probability of the sampled token), ``margin`` (top-1 minus top-2 probability),
``neg_entropy`` (negative entropy), ``exp_neg_entropy`` (``exp(-entropy)``, a confidence in (0, 1]),
``uniform`` (a counter-based uniform draw per cell: random order), ``coins`` (Dream's ``origin``: 1 where the
cell's independent coin came up; the fixed policy then commits exactly those cells).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .registry import Registry

__all__ = ["FALLBACK_ORDERING", "HEAD_STATISTIC", "ORDERINGS", "SOURCES", "Ordering", "confidence_orderings",
           "default_ordering", "head_statistics", "ordering_flags", "register_ordering", "unregister_ordering"]

SOURCES = ("prob", "margin", "neg_entropy", "exp_neg_entropy", "uniform", "coins")
# The extra statistic of the head (a key of ops.row_stats beyond the sampled token's probability) a source reads.
HEAD_STATISTIC = {"margin": "margin", "neg_entropy": "neg_entropy", "exp_neg_entropy": "neg_entropy"}
# The ordering of a family that names none.
FALLBACK_ORDERING = "maskgit_plus"


@dataclass(frozen=True, slots=True)
class Ordering:
    """``score``: the source ranking the candidates under the fixed policy; ``confidence``: the source the
    adaptive policies compare to their thresholds (a probability-like value); ``raw``: ``prob`` is the softmax of
    the raw logits at the sampled token (LLaDA's ``low_confidence``), not of the tempered, filtered ones;
    ``families``: the model architectures (``ModelConfig.arch``) whose default ordering this is."""

    name: str
    score: str = "prob"
    confidence: str = "prob"
    raw: bool = False
    families: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for source in (self.score, self.confidence):
            if source not in SOURCES:
                raise ValueError(f"an ordering's source must be one of {', '.join(SOURCES)}; got {source!r}.")

    @property
    def ranks_confidence(self) -> bool:
        """Whether the fixed policy ranks by a confidence (so Dream's position temperature ``alg_temp`` applies),
        not by random draws."""
        return self.score not in ("uniform", "coins")

    @property
    def coins(self) -> bool:
        """Whether the fixed policy's count is the number of coins that came up (not the family's schedule)."""
        return self.score == "coins"

    def source(self, adaptive: bool) -> str:
        return self.confidence if adaptive else self.score


ORDERINGS: Registry[Ordering] = Registry("ordering")


def register_ordering(ordering: Ordering) -> None:
    ORDERINGS.register(ordering.name, ordering)


def unregister_ordering(name: str) -> None:
    ORDERINGS.unregister(name)


# LLaDA's (and SDAR's, LLaDA-MoE's, LLaDA2's): low_confidence (softmax of the raw logits at the sampled token), random.
# Dream's: origin (each position unmasked by an independent coin), maskgit_plus (probability of the sampled token),
# topk_margin (top-1 minus top-2 probability), entropy (negative entropy).
for _ordering in (Ordering("low_confidence", raw=True, families=("llada", "sdar", "llada_moe", "llada2")),
                  Ordering("random", "uniform"),
                  Ordering("origin", "coins"), Ordering("maskgit_plus", families=("dream",)),
                  Ordering("topk_margin", "margin", "margin"), Ordering("entropy", "neg_entropy", "exp_neg_entropy")):
    register_ordering(_ordering)


def default_ordering(arch: str) -> str:
    """The ordering a request of architecture ``arch`` uses when it names none."""
    for ordering in ORDERINGS.values():
        if arch in ordering.families:
            return ordering.name
    return FALLBACK_ORDERING


def confidence_orderings() -> tuple[str, ...]:
    """The orderings ``alg_temp`` applies to."""
    return tuple(o.name for o in ORDERINGS.values() if o.ranks_confidence)


def ordering_flags(orderings: Sequence[str], adaptive: Sequence[bool],
                   alg_temps: Sequence[float | None]) -> dict[str, list[bool]]:
    """Per request, which source scores it: ``ord_<source>`` for every source but ``prob`` (the default), and
    ``ord_alg`` (Dream's position temperature; fixed policy only)."""
    used = [ORDERINGS[o].source(a) for o, a in zip(orderings, adaptive, strict=True)]
    flags = {f"ord_{s}": [u == s for u in used] for s in SOURCES[1:]}
    flags["ord_alg"] = [(t or 0) > 0 and not a for t, a in zip(alg_temps, adaptive, strict=True)]
    return flags


def head_statistics(orderings: Sequence[str]) -> set[str]:
    """The extra statistics of the head that the orderings ``orderings`` read, under either policy kind."""
    return {HEAD_STATISTIC[s] for o in set(orderings) for s in (ORDERINGS[o].score, ORDERINGS[o].confidence)
            if s in HEAD_STATISTIC}
