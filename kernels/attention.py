"""Flash-attention forward over packed variable-length sequences (bidirectional or block-causal, GQA, key
validity mask); its reference is ``kernels.reference.attention_reference``."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..contract import KERNEL_FLOATS, Contract, same_dtype


@triton.jit
def _attention_inner(acc, l_i, m_i, q, k_base, v_base, valid_base, stride_kn, stride_vn, row_lim, lo, hi,
                     qk_scale, offs_n, offs_d, MASKED: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                     CAST_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key tiles [lo, hi). MASKED tiles may hold keys at or past ``hi`` (not loaded)
    and keys hidden from some rows (key position >= that row's ``row_lim``); unmasked tiles are in bounds
    and visible to every row, so they skip the per-element compare and select."""
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        in_bounds = k_pos < hi
        # K and V rows are read once per tile for all BLOCK_M * G query rows: GQA costs no extra traffic.
        if MASKED:
            k = tl.load(k_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=in_bounds[:, None], other=0.0)
            v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=in_bounds[:, None], other=0.0)
        else:
            k = tl.load(k_base + k_pos[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :])
        if CAST_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            s = tl.where(k_pos[None, :] < row_lim[:, None], s, float("-inf"))
        if HAS_KEY_VALID:
            ok = tl.load(valid_base + k_pos, mask=in_bounds, other=0) != 0
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_KEY_VALID:
            # A row that has seen no visible key yet keeps m = -inf; exponentiate against 0 so that it gets
            # p = 0 and alpha = 0 instead of NaN from (-inf) - (-inf).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if CAST_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, valid_ptr,  # q/out [N, H, D], k/v [N, KV, D], cu [B+1], valid [N]
    qk_scale, block_size,  # softmax scale * log2(e); block length of the block-causal mask
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    G: tl.constexpr, G_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, CAST_FP32: tl.constexpr,
):
    """One program: BLOCK_M query tokens of sequence ``program_id(2)`` x the G query heads of KV head
    ``program_id(1)``, as BLOCK_M * G_P2 rows (token-major, so a token's G heads are adjacent in memory)."""
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
    first_q = pid_m * BLOCK_M
    if first_q >= seqlen:  # the grid is sized for the longest sequence
        return

    offs_r = tl.arange(0, BLOCK_M * G_P2)
    q_pos = first_q + offs_r // G_P2
    head = kv_head * G + offs_r % G_P2
    row_ok = (q_pos < seqlen) & (offs_r % G_P2 < G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(q_ptr + (start + q_pos)[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if CAST_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + start * stride_kn + kv_head * stride_kh
    v_base = v_ptr + start * stride_vn + kv_head * stride_vh
    valid_base = valid_ptr + start

    if BLOCK_CAUSAL:
        # Keys before the end of the first query's block are seen by every row of the tile; the tile reads
        # nothing past the end of its last query's block.
        last_q = tl.minimum(first_q + BLOCK_M, seqlen) - 1
        full_end = tl.minimum(seqlen, (first_q // block_size + 1) * block_size)
        hi = tl.minimum(seqlen, (last_q // block_size + 1) * block_size)
        row_lim = tl.minimum(seqlen, (q_pos // block_size + 1) * block_size)
    else:
        full_end = seqlen
        hi = seqlen
        row_lim = tl.zeros([BLOCK_M * G_P2], dtype=tl.int32) + seqlen
    mid = (full_end // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M * G_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * G_P2], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * G_P2, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attention_inner(acc, l_i, m_i, q, k_base, v_base, valid_base, stride_kn, stride_vn, row_lim,
                                     0, mid, qk_scale, offs_n, offs_d, False, HAS_KEY_VALID, CAST_FP32, BLOCK_N)
    # When BLOCK_M divides block_size (or there is no block mask) this is at most the one partial tile.
    acc, l_i, m_i = _attention_inner(acc, l_i, m_i, q, k_base, v_base, valid_base, stride_kn, stride_vn, row_lim,
                                     mid, hi, qk_scale, offs_n, offs_d, True, HAS_KEY_VALID, CAST_FP32, BLOCK_N)
    # Rows without any visible key have l = 0 and acc = 0: they output zeros.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (start + q_pos)[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _config(head_dim: int, g_p2: int, fp32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): about 128 query rows (64 in fp32, whose tiles are twice the
    bytes) per program whatever the group size, so that each K/V tile read feeds as many rows as fit."""
    rows, block_n = (64, 32) if fp32 or head_dim > 128 else (128, 64)
    num_warps = 8 if rows * head_dim >= 128 * 128 else 4
    return max(rows // g_p2, 1), block_n, num_warps, 2 if fp32 else 3



def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
              block_size: int | None = None, key_valid: torch.Tensor | None = None, scale: float | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention within each packed sequence: queries of sequence b attend to the keys of sequence b.

    q ``[N, H, D]``, k and v ``[N, KV, D]`` (fp16, bf16 or fp32, last dim contiguous, H a multiple of KV,
    D a power of two in 16..256); ``cu_seqlens`` int32 ``[B+1]`` cumulative starts (0 first, N last);
    ``max_seqlen`` the longest sequence (host int, sizes the grid; a smaller value leaves rows unwritten).
    ``block_size``: block-causal mask, a query in block j (blocks counted from its sequence's first token)
    sees the keys of blocks <= j. ``key_valid`` bool/int8 ``[N]``: keys whose entry is 0 are ignored; a
    query with no visible valid key outputs zeros. Softmax ``scale`` defaults to 1/sqrt(D). Returns ``out``
    ``[N, H, D]`` in q's dtype (allocated when None).
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k and v must be [tokens, heads, head_dim]; got {q.ndim}, {k.ndim} and {v.ndim} dims.")
    n, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"k and v must be [{n}, kv_heads, {d}] like q {tuple(q.shape)}; got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}.")
    kv = k.shape[1]
    if kv == 0 or h % kv:
        raise ValueError(f"the {h} query heads must be a multiple of the {kv} key/value heads.")
    same_dtype({"q": q, "k": k, "v": v}, KERNEL_FLOATS)
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two from 16 to 256; got {d}.")
    check = Contract("q", q)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(name, t, last_dim_contiguous=True)
    check("cu_seqlens", cu_seqlens, torch.int32, ndim=1, dims="[B+1]")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B + 1 >= 1 entries, got 0.")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be at least 1 (or None for bidirectional); got {block_size}.")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be non-negative; got {max_seqlen}.")
    if key_valid is not None:
        check("key_valid", key_valid, (torch.bool, torch.int8, torch.uint8), ndim=1, dims="[N]", length=(n, "N, as q"))
        # bool and int8 share one byte per entry: the kernel reads bytes and tests them against 0.
        key_valid = key_valid.contiguous().view(torch.uint8)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        check("out", out, q.dtype, shape=tuple(q.shape), dims="[N, H, D]", last_dim_contiguous=True)
    batch = cu_seqlens.numel() - 1
    if n == 0 or batch == 0 or max_seqlen == 0:
        return out

    g = h // kv
    g_p2 = triton.next_power_of_2(g)
    # bf16 tl.dot is wrong under the CPU interpreter: there, and for fp32 inputs, tiles are cast to fp32 and
    # multiplied in IEEE fp32 (no TF32); fp16 and bf16 on the GPU use the tensor cores with fp32 accumulation.
    cast_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type != "cuda")
    block_m, block_n, num_warps, num_stages = _config(d, g_p2, cast_fp32)
    if block_size is not None and block_size >= max_seqlen:
        block_size = None  # one block spans every sequence: the mask is bidirectional
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (triton.cdiv(max_seqlen, block_m), kv, batch)
    _attention_kernel[grid](
        q, k, v, out, cu_seqlens, cu_seqlens if key_valid is None else key_valid,
        scale * math.log2(math.e), block_size or 1,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        G=g, G_P2=g_p2, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_CAUSAL=block_size is not None,
        HAS_KEY_VALID=key_valid is not None, CAST_FP32=cast_fp32, num_warps=num_warps, num_stages=num_stages,
    )
    return out
