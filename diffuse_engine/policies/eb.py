"""Entropy-bounded sampling (EB-sampler): commit in order of confidence while the summed entropy of the committed
tokens minus its largest term stays <= ``eb_gamma`` (at least one token)."""

from __future__ import annotations

from .adaptive import AdaptivePolicy
from .base import COMMIT_ENTROPY, CommitRule
from .state import BlockState


class EntropyBounded(AdaptivePolicy):
    name = "eb"
    needs = ("neg_entropy",)

    def rule(self, state: BlockState) -> CommitRule:
        return CommitRule(COMMIT_ENTROPY, eb_gamma=state.params.eb_gamma)
