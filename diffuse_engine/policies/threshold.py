"""Confidence threshold with a top-1 fallback (Fast-dLLM ``get_transfer_index`` with ``threshold``): commit every
candidate whose confidence is >= ``threshold``, and always the most confident one."""

from __future__ import annotations

from .adaptive import AdaptivePolicy
from .base import COMMIT_THRESHOLD, CommitRule
from .state import BlockState


class Threshold(AdaptivePolicy):
    name = "threshold"

    def rule(self, state: BlockState) -> CommitRule:
        return CommitRule(COMMIT_THRESHOLD, threshold=state.params.threshold)
