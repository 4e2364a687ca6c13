"""WINO-style verification (wide-in, narrow-out): every committed token of the current block is scored again
with its own position hidden; a token whose probability falls below ``verify_threshold`` goes back to [MASK].
Paired with ``policy="threshold"`` and a low ``threshold`` it accepts wide and keeps only what survives."""

from __future__ import annotations

from .base import Revision, RevisionContext


class Wino:
    name = "wino"
    verifies = True

    def revise(self, ctx: RevisionContext) -> Revision:
        return Revision(ctx.committed & (ctx.p_current < ctx.verify_threshold[:, None]))
