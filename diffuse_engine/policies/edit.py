"""Token-to-token edits (LLaDA2.1 style): a committed token of the current block is replaced by the most probable
token at its position (scored with the position hidden) when that token's probability beats the committed one's
by at least ``edit_margin``."""

from __future__ import annotations

import torch

from .base import Revision


class Edit:
    name = "edit"
    verifies = True

    def revise(self, req, committed: torch.Tensor, verify, index: int) -> Revision:
        if verify is None:
            return Revision([], {})
        a, b = verify.starts[index], verify.starts[index + 1]
        top, cur = verify.top_token[a:b], verify.current[a:b]
        better = (top != cur) & (top != req.mask_id) & (verify.top_prob[a:b] - verify.p_current[a:b]
                                                          >= req.params.edit_margin)
        pos = verify.position[a:b][better].tolist()
        return Revision([], dict(zip(pos, top[better].tolist(), strict=True)))
