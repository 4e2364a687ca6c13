"""The routed experts of a mixture-of-experts feed-forward in plain torch: the engine's torch path for
``ops.moe_experts`` (:func:`moe_experts_grouped`), the per-expert masked loop that models commonly ship
(:func:`moe_experts_loop`, a benchmark baseline), and the one contract check every path shares
(:func:`check_moe_args`). Semantics: :func:`kernels.reference.moe_experts_reference`.

Grouped path: the N*k (token, slot) pairs are sorted by expert (stable, so token order within an expert), each
expert with tokens runs gate and up on its rows, SwiGLU in fp32 rounded once to the input dtype, and down; the
results go back to their pairs and each token sums its k weighted rows in slot order (fp32, fp64 for fp64). A row's
result depends only on that row as long as each matmul does: the caller passes ``ops.linear`` (padded to a multiple
of ``pad_rows`` rows on the CPU) and ``pad_rows``, so the elementwise SwiGLU also runs on whole padded groups.

``torch._grouped_mm`` (one launch per projection, no host sync) replaces the per-expert loop where
:func:`grouped_mm_applies` says it can (CUDA, bf16, 16-byte aligned rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..contract import FLOATING, Contract, same_dtype

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_moe_args(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, check_ids: bool = True) -> tuple[int, ...]:
    """(N, d, E, I, k) after checking the contract of ``ops.moe_experts``; ValueError with a sentence otherwise.
    ``check_ids`` also checks that every id is in [0, E) (a device sync on CUDA)."""
    check = Contract("x", x)
    n, d = check("x", x, ndim=2, dims="[N, d]").shape
    e, i, d_gate = check("w_gate", w_gate, ndim=3, dims="[E, I, d]").shape
    if d_gate != d:
        raise ValueError(f"w_gate must be [E, I, d] with d = {d} (x's last dimension); got shape "
                         f"{tuple(w_gate.shape)}.")
    if e < 1 or i < 1 or d < 1:
        raise ValueError(f"the experts need E >= 1, I >= 1 and d >= 1; got E = {e}, I = {i}, d = {d}.")
    check("w_up", w_up, shape=(e, i, d), dims="[E, I, d], as w_gate")
    check("w_down", w_down, shape=(e, d, i), dims="[E, d, I], w_gate's E and I")
    same_dtype({"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}, FLOATING)
    k = check("topk_ids", topk_ids, (torch.int32, torch.int64), ndim=2, dims="[N, k]",
              length=(n, "N, as x's rows")).shape[1]
    if k < 1:
        raise ValueError(f"topk_ids must route each token to at least one expert; got shape {tuple(topk_ids.shape)}.")
    check("topk_weights", topk_weights, FLOATING, shape=(n, k), dims="[N, k], as topk_ids")
    if check_ids and topk_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(topk_ids))
        if lo < 0 or hi >= e:
            raise ValueError(f"topk_ids must hold expert ids in [0, {e}) (E = {e} experts); got ids from {lo} "
                             f"to {hi}.")
    return n, d, e, i, k


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: the dtype of the weighted sum (and of SwiGLU)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def combine(y: torch.Tensor, topk_weights: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``sum_j topk_weights[:, j] * y[:, j]`` for y ``[N, k, d]``, slot by slot in order (elementwise products and
    sums only: each token's bits are independent of the others), in the accumulation dtype; cast to out_dtype."""
    acc_dtype = accumulation_dtype(out_dtype)
    w = topk_weights.to(acc_dtype)
    out = y[:, 0].to(acc_dtype) * w[:, :1]
    for j in range(1, y.shape[1]):
        out += y[:, j].to(acc_dtype) * w[:, j:j + 1]
    return out.to(out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in the accumulation dtype, rounded once to the inputs' dtype."""
    acc_dtype = accumulation_dtype(gate.dtype)
    return (F.silu(gate.to(acc_dtype)) * up.to(acc_dtype)).to(gate.dtype)


def grouped_mm_applies(x: torch.Tensor, w_gate: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run this problem: it exists, CUDA bf16 tensors on a device of compute
    capability 9.0 or newer, d and I multiples of 8 (its operands need 16-byte aligned rows)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    _, i, d = w_gate.shape
    return torch.cuda.get_device_capability(x.device) >= (9, 0) and d % 8 == 0 and i % 8 == 0


def _sorted_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): the pair indices n*k + j sorted by expert (stable) and the number of pairs per expert."""
    flat = topk_ids.reshape(-1).long()
    return torch.sort(flat, stable=True).indices, torch.bincount(flat, minlength=num_experts)


def _experts_loop(rows: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, linear: Linear, pad_rows: int) -> torch.Tensor:
    """Each expert's rows (contiguous in ``rows``, ``counts`` per expert) through its SwiGLU MLP."""
    out = rows.new_empty(rows.shape)
    start = 0
    for e, count in enumerate(counts.tolist()):  # one host sync: the group sizes
        if not count:
            continue
        group = rows[start:start + count]
        if count % pad_rows:
            group = torch.cat([group, group.new_zeros(pad_rows - count % pad_rows, group.shape[1])])
        h = swiglu(linear(group, w_gate[e]), linear(group, w_up[e]))
        out[start:start + count] = linear(h, w_down[e])[:count]
        start += count
    return out


def _experts_grouped_mm(rows: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        w_down: torch.Tensor) -> torch.Tensor:
    """The same with one ``torch._grouped_mm`` per projection (weights passed as ``[E, in, out]`` views)."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    gate = torch._grouped_mm(rows, w_gate.transpose(1, 2), offs=offs)
    up = torch._grouped_mm(rows, w_up.transpose(1, 2), offs=offs)
    return torch._grouped_mm(swiglu(gate, up), w_down.transpose(1, 2), offs=offs)


def moe_experts_grouped(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                        topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, linear: Linear = F.linear,
                        pad_rows: int = 1, grouped_mm: bool | None = None) -> torch.Tensor:
    """The grouped torch path (arguments as :func:`kernels.reference.moe_experts_reference`, already checked).
    ``linear(rows, weight)``: the matmul of the per-expert loop; ``pad_rows``: group row counts are padded to a
    multiple of it; ``grouped_mm``: use ``torch._grouped_mm`` (None: where :func:`grouped_mm_applies`)."""
    n, k = topk_ids.shape
    if n == 0:
        return x.new_empty((0, x.shape[1]))
    order, counts = _sorted_pairs(topk_ids, w_gate.shape[0])
    rows = x[order // k]
    if grouped_mm if grouped_mm is not None else grouped_mm_applies(x, w_gate):
        y_sorted = _experts_grouped_mm(rows, counts, w_gate, w_up, w_down)
    else:
        y_sorted = _experts_loop(rows, counts, w_gate, w_up, w_down, linear, pad_rows)
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return combine(y.view(n, k, -1), topk_weights, x.dtype)


def moe_experts_loop(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The per-expert loop most published MoE code runs: for every expert (used or not), a mask over the routing
    table, its tokens through its MLP in the input dtype, weighted and added into the output with ``index_add_``.
    The benchmarks' baseline; not batch-invariant (plain F.linear on varying row counts)."""
    out = torch.zeros(x.shape, dtype=accumulation_dtype(x.dtype), device=x.device)
    for e in range(w_gate.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        rows = x[token]
        y = F.linear(F.silu(F.linear(rows, w_gate[e])) * F.linear(rows, w_up[e]), w_down[e])
        out.index_add_(0, token, y.to(out.dtype) * topk_weights[token, slot, None].to(out.dtype))
    return out.to(x.dtype)
