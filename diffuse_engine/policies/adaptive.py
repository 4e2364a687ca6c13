"""What the adaptive policies share: a block ends when it has no mask left (or at a step cap)."""

from __future__ import annotations


class AdaptivePolicy:
    adaptive = True

    def block_done(self, req) -> bool:
        start, end = req.block_span
        # A model may predict [MASK] itself, which commits nothing; the cap keeps such a block finite.
        return req.block_masked_count == 0 or req.block_step >= 2 * (end - start)
