"""WINO-style verification (wide-in, narrow-out): every committed token of the current block is scored again
with its own position hidden; a token whose probability falls below ``verify_threshold`` goes back to [MASK].
Paired with ``policy="threshold"`` and a low ``threshold`` it accepts wide and keeps only what survives."""

from __future__ import annotations

import torch

from .base import Revision


class Wino:
    name = "wino"
    verifies = True

    def revise(self, req, committed: torch.Tensor, verify, index: int) -> Revision:
        if verify is None:
            return Revision([], {})
        a, b = verify.starts[index], verify.starts[index + 1]
        low = verify.p_current[a:b] < req.params.verify_threshold
        return Revision(verify.position[a:b][low].tolist(), {})
