"""Fast-dLLM's factor rule (``get_transfer_index_dynamic``): with confidences sorted c_0 >= c_1 >= ..., commit
the largest prefix whose i-th confidence stays >= 1 - factor / (i + 2), at least one token."""

from __future__ import annotations

from .adaptive import AdaptivePolicy
from .base import COMMIT_FACTOR, CommitRule
from .state import BlockState


class Factor(AdaptivePolicy):
    name = "factor"

    def rule(self, state: BlockState) -> CommitRule:
        return CommitRule(COMMIT_FACTOR, factor=state.params.factor)
