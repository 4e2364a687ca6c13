"""Routed experts of a mixture-of-experts feed-forward as two grouped GEMMs over expert-sorted rows, SwiGLU fused into
the first, then a weighted combine in slot order; its reference is ``moe_experts_reference``.

Layout (:func:`align`, on the device, no host sync): the N*k (token, slot) pairs, sorted by expert, are laid out in
blocks of BLOCK_M rows that each hold pairs of one expert only (an expert's last block is padded with -1). The
grid's first axis is an upper bound on the number of blocks; programs past the last block return at once.

Memory traffic: every block reads its expert's three weight matrices once per column tile; when an expert's tokens
fit in one block (decoding: N*k/E tokens per expert), the weights of each touched expert are read once, which is
the floor. The activation h = silu(x W_g^T) * (x W_u^T) is written once, in the input dtype, and read once by the
down GEMM; its fp32 output rows (one per pair) are read once by the combine.

Batch invariance: tile sizes depend on d, I and the dtype only, never on N, and each output row of a tile depends
only on its own input row, so a token's result is the same bits whatever else is in the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import KERNEL_FLOATS, dtype_name
from .moe_torch import check_moe_args


@triton.jit
def _gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, pairs_ptr, block_expert_ptr, act_ptr,  # x [N, d]; w_g, w_u [E, I, d]; act [rows, I]
    D, INTER, TOPK,
    stride_xn, stride_xd, stride_we, stride_wi, stride_wd, stride_am, stride_ai,
    CAST_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Block ``program_id(0)`` of pairs x columns ``program_id(1)`` of I: the gate and up tiles accumulate side by
    side over d (x read once for both), then act = silu(gate) * up is written once."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_m)
    row_ok = pair >= 0
    token = tl.where(row_ok, pair // TOPK, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    w_off = expert * stride_we + cols.to(tl.int64)[:, None] * stride_wi
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        a = tl.load(x_ptr + token[:, None] * stride_xn + kk[None, :] * stride_xd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = col_ok[:, None] & k_ok[None, :]
        wg = tl.load(wg_ptr + w_off + kk[None, :] * stride_wd, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + w_off + kk[None, :] * stride_wd, mask=w_mask, other=0.0)
        if CAST_FP32:
            a = a.to(tl.float32)
            acc_g = tl.dot(a, tl.trans(wg.to(tl.float32)), acc_g, input_precision="ieee")
            acc_u = tl.dot(a, tl.trans(wu.to(tl.float32)), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, tl.trans(wg), acc_g)
            acc_u = tl.dot(a, tl.trans(wu), acc_u)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(act_ptr + offs_m.to(tl.int64)[:, None] * stride_am + cols[None, :] * stride_ai,
             h.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, wd_ptr, pairs_ptr, block_expert_ptr, y_ptr,  # act [rows, I]; w_d [E, d, I]; y [N*k, d] fp32
    D, INTER,
    stride_am, stride_ai, stride_we, stride_wd, stride_wi, stride_yp, stride_yd,
    CAST_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Block ``program_id(0)`` x columns ``program_id(1)`` of d: y[pair] = act[row] W_d^T, stored at the pair's
    own row so that the combine reads each token's k rows in slot order."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_m)
    row_ok = pair >= 0
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    a_off = offs_m.to(tl.int64)[:, None] * stride_am
    w_off = expert * stride_we + cols.to(tl.int64)[:, None] * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < INTER
        a = tl.load(act_ptr + a_off + kk[None, :] * stride_ai, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wd_ptr + w_off + kk[None, :] * stride_wi, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if CAST_FP32:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    rows = tl.where(row_ok, pair, 0).to(tl.int64)
    tl.store(y_ptr + rows[:, None] * stride_yp + cols[None, :] * stride_yd, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    y_ptr, w_ptr, out_ptr,  # y [N*k, d] fp32 (row n*k + j); w [N, k] fp32; out [N, d]
    N, D, TOPK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n] = sum_j w[n, j] * y[n*k + j], slot by slot in order (fp32): the same sum whatever the tiling."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for j in tl.static_range(TOPK):
        w = tl.load(w_ptr + rows * TOPK + j, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + (rows.to(tl.int64) * TOPK + j)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        acc += w[:, None] * y
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, block_expert): ``pairs`` int32 ``[blocks * block_m]``, the pair indices n*k + j in expert order
    (stable) with each expert's run padded to a multiple of block_m by -1; ``block_expert`` int32 ``[blocks]``, the
    expert of each block, -1 past the last. ``blocks`` = cdiv(N*k, block_m) + min(E, N*k), a bound that needs no
    host sync (an expert with tokens pads its last block by fewer than block_m rows)."""
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    dev = flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    blocks = (counts + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)
    first_row = (ends - blocks) * block_m  # each expert's first padded row
    first_pair = torch.cumsum(counts, 0) - counts  # each expert's first position in sorted order
    expert = flat[order]
    dest = first_row[expert] + torch.arange(p, device=dev) - first_pair[expert]
    max_blocks = triton.cdiv(p, block_m) + min(num_experts, p)
    pairs = torch.full((max_blocks * block_m,), -1, dtype=torch.int32, device=dev)
    pairs[dest] = order.to(torch.int32)
    block_expert = torch.searchsorted(ends, torch.arange(max_blocks, device=dev), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def _tiles(d: int, i: int, dtype: torch.dtype, on_gpu: bool, block_m: int | None) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) from d, I and the dtype only (never N: batch invariance).
    GPU: 16-row blocks (decoding routes few tokens to each expert), 64 x 64 weight tiles (32-deep for fp32, whose
    IEEE products take twice the shared memory). The interpreter runs whole blocks as numpy arrays: there fewer,
    larger programs are faster."""
    if not on_gpu:
        big = max(16, triton.next_power_of_2(max(d, i)))
        return block_m or 16, min(128, big), min(128, big), 1, 1
    return block_m or 16, 64, 32 if dtype == torch.float32 else 64, 4, 3


def moe_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, block_m: int | None = None,
                check_ids: bool = True) -> torch.Tensor:
    """``moe_experts_reference(...)`` in x's dtype with fp32 accumulation, SwiGLU in fp32 rounded once to x's dtype.

    x ``[N, d]``; w_gate, w_up ``[E, I, d]``; w_down ``[E, d, I]`` (one dtype of fp32, fp16, bf16); topk_ids
    ``[N, k]`` int32/int64 in [0, E) (``check_ids``: checked, one device sync); topk_weights ``[N, k]`` (any float
    dtype). ``block_m``: rows per block (a power of two >= 16; None: 16). Returns ``[N, d]`` in x's dtype."""
    n, d, e, i, k = check_moe_args(x, w_gate, w_up, w_down, topk_ids, topk_weights, check_ids=check_ids)
    if x.dtype not in KERNEL_FLOATS:
        raise ValueError(f"the Triton MoE kernel reads float32, float16 or bfloat16; got {dtype_name(x.dtype)}.")
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two >= 16; got {block_m}.")
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    on_gpu = x.device.type == "cuda"
    bm, bn, bk, num_warps, num_stages = _tiles(d, i, x.dtype, on_gpu, block_m)
    # bf16 tl.dot is wrong under the interpreter: off the GPU every tile is cast to fp32; fp32 inputs use IEEE fp32
    # products (no TF32) on the GPU too; fp16 and bf16 on the GPU use the tensor cores with fp32 accumulation.
    cast = x.dtype == torch.float32 or not on_gpu
    pairs, block_expert = align(topk_ids, e, bm)
    blocks = block_expert.shape[0]
    w_gate, w_up, w_down = (w.contiguous() for w in (w_gate, w_up, w_down))
    act = torch.empty((blocks * bm, i), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(blocks, triton.cdiv(i, bn))](
        x, w_gate, w_up, pairs, block_expert, act, d, i, k, *x.stride(), *w_gate.stride(), *act.stride(),
        CAST_FP32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages)
    y = torch.empty((n * k, d), dtype=torch.float32, device=x.device)
    _down_kernel[(blocks, triton.cdiv(d, bn))](
        act, w_down, pairs, block_expert, y, d, i, *act.stride(), *w_down.stride(), *y.stride(),
        CAST_FP32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages)
    block_r, block_d = (16, 128) if on_gpu else (64, max(16, min(1024, triton.next_power_of_2(d))))
    _combine_kernel[(triton.cdiv(n, block_r), triton.cdiv(d, block_d))](
        y, topk_weights.to(torch.float32).contiguous(), out, n, d, TOPK=k, BLOCK_R=block_r, BLOCK_D=block_d)
    return out
