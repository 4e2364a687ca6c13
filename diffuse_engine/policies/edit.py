"""Token-to-token edits (LLaDA2.1 style): a committed token of the current block is replaced by the most probable
token at its position (scored with the position hidden) when that token's probability beats the committed one's
by at least ``edit_margin``."""

from __future__ import annotations

import torch

from .base import Revision, RevisionContext


class Edit:
    name = "edit"
    verifies = True

    def revise(self, ctx: RevisionContext) -> Revision:
        better = (ctx.committed & (ctx.top_token != ctx.current) & (ctx.top_token != ctx.mask_id)
                  & (ctx.top_prob - ctx.p_current >= ctx.edit_margin[:, None]))
        return Revision(torch.zeros_like(better), better, ctx.top_token)
