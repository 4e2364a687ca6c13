"""What the adaptive policies share: a block ends when it has no mask left (or at a step cap)."""

from __future__ import annotations

from .state import BlockState


class AdaptivePolicy:
    adaptive = True
    needs: tuple[str, ...] = ()

    def block_done(self, state: BlockState) -> bool:
        # A model may predict [MASK] itself, which commits nothing; the cap keeps such a block finite.
        return state.masked == 0 or state.block_step >= 2 * state.block_len
