"""``ops.linear``: the one matmul of the models, batch-invariant on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CPU matmuls are computed over row counts padded to a multiple of this: oneDNN/MKL then give every row the
# same bits whatever the number of rows, which makes a request's tokens independent of its batch.
INVARIANT_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` ``[rows, in]``. On the CPU the row count is padded to a multiple of
    :data:`INVARIANT_ROWS` so that every row's result is independent of the other rows (batch invariance)."""
    rows = x.shape[0]
    if x.device.type == "cpu" and rows % INVARIANT_ROWS:
        padded = x.new_zeros((rows + INVARIANT_ROWS - rows % INVARIANT_ROWS, x.shape[1]))
        padded[:rows] = x
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)
