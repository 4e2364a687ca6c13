"""``ops.moe_experts``: the routed experts of a mixture-of-experts layer (SwiGLU experts, top-k weighted sum).

A plain fallback: tokens are grouped by expert, each expert runs as :func:`~.linear.linear` calls (batch-invariant on
the CPU), and every token's k slot outputs are summed in slot order. Routing never drops a token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import linear


def moe_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """``out[n] = sum_j topk_weights[n, j] * down_e(silu(gate_e x[n]) * up_e x[n])`` with ``e = topk_ids[n, j]``.

    x ``[N, d]``; w_gate, w_up ``[E, I, d]``; w_down ``[E, d, I]``; topk_ids ``[N, k]`` int64; topk_weights
    ``[N, k]``. Accumulated in fp32 (fp64 for fp64 inputs), returned in x's dtype."""
    if x.ndim != 2 or topk_ids.ndim != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts takes x [N, d] and topk_ids / topk_weights [N, k]; got {tuple(x.shape)}, "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}.")
    num_experts, inter, d = w_gate.shape
    if w_up.shape != w_gate.shape or w_down.shape != (num_experts, d, inter) or x.shape[1] != d:
        raise ValueError(f"expert weights must be w_gate, w_up [E, I, d] and w_down [E, d, I] with d = "
                         f"{x.shape[1]}; got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}.")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    slot_out = torch.empty(n * k, d, dtype=acc, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        xe = x[slots // k]
        h = F.silu(linear(xe, w_gate[e])) * linear(xe, w_up[e])
        slot_out[slots] = linear(h, w_down[e]).to(acc)
        start += count
    weighted = slot_out.view(n, k, d) * topk_weights.to(acc)[:, :, None]
    out = torch.zeros(n, d, dtype=acc, device=x.device)
    for j in range(k):  # slot order, whatever the batch
        out += weighted[:, j]
    return out.to(x.dtype)
