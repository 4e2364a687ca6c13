"""Block attention over a paged KV cache (K3): the L queries of a diffusion block attend, non-causally, to the
cached prefix and suffix plus the block's own fresh keys, with RoPE applied in the kernel. Reference:
``reference.block_attention_cached_reference``."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..contract import FLOATING, KERNEL_FLOATS, Contract, same_dtype

_NOMINAL_SMS = 132  # H100 SXM; the device's own count is used when there is one
_MAX_ROWS = 128  # query rows (block tokens x heads of a group) per program: the fp32 accumulator lives in registers
_BLOCK_N = 64  # cached keys per tile
_BLOCK_F = 16  # fresh keys per tile: small, since their RoPE runs on fp32 tiles in registers


@triton.jit
def _load_rope(x_ptr, row_off, s_d, cos_ptr, sin_ptr, cs_off, ok, D: tl.constexpr, ROPE: tl.constexpr):
    """Rows ``x[row_off]`` ``[R, D]`` in fp32, rotated when ROPE: x*cos + rotate_half(x)*sin, rotate_half(x) =
    (-x2, x1). The partner half is a second load of the same (cached) row, cheaper than a register shuffle."""
    d = tl.arange(0, D)
    x = tl.load(x_ptr + row_off[:, None] + d[None, :] * s_d, mask=ok[:, None], other=0.0).to(tl.float32)
    if not ROPE:
        return x
    sign = tl.where(d < D // 2, -1.0, 1.0)
    xp = tl.load(x_ptr + row_off[:, None] + ((d + D // 2) % D)[None, :] * s_d, mask=ok[:, None], other=0.0)
    c = tl.load(cos_ptr + cs_off[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    s = tl.load(sin_ptr + cs_off[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    return x * c + sign[None, :] * xp.to(tl.float32) * s


@triton.jit
def _attend(q, k, v, col_ok, m_i, l_i, acc, scale_log2, DOT_F32: tl.constexpr):
    """One online-softmax step (base 2) of the rows of q over the key tile k / v."""
    if DOT_F32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="tf32x3")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(col_ok[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="tf32x3")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _block_attn_cached_kernel(
    q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, cache_lens_ptr, block_start_ptr,
    cos_ptr, sin_ptr, o_ptr, lse_ptr,
    L, G, H, num_splits, num_l_tiles, scale_log2,
    s_qb, s_ql, s_qh, s_qd, s_knb, s_knl, s_knh, s_knd, s_vnb, s_vnl, s_vnh, s_vnd,
    s_kp, s_ks, s_kh, s_kd, s_vp, s_vs, s_vh, s_vd, s_bt,
    s_os, s_ob, s_ol, s_oh, s_od,
    D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_L: tl.constexpr, G_P2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr, WRITE_CACHE: tl.constexpr, STORE_LSE: tl.constexpr, DOT_F32: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Program (request b, kv head, split x L tile). Rows = BLOCK_L block tokens x the G_P2 query heads of the kv
    head (GQA packing: each K/V tile is read once for the whole group). Cached keys are the virtual sequence
    prefix [0, min(bs, cl)) ++ suffix [bs + L, cl), so no tile is spent on the block's stale slots; the split
    takes a contiguous range of its tiles; the last split also takes the L fresh keys, and its first L tile
    writes them to the cache (reads never touch the block's slots, so no ordering between programs is needed)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2) // num_l_tiles
    lt = tl.program_id(2) % num_l_tiles
    d = tl.arange(0, D)
    r = tl.arange(0, BLOCK_L * G_P2)
    tok = lt * BLOCK_L + r // G_P2
    h = kvh * G + r % G_P2
    row_ok = (tok < L) & (r % G_P2 < G)
    q = _load_rope(q_ptr + b * s_qb, tok * s_ql + h * s_qh, s_qd, cos_ptr, sin_ptr, (b * L + tok) * D, row_ok, D,
                   ROPE)
    if not DOT_F32:
        q = q.to(k_cache_ptr.dtype.element_ty)

    cl = tl.load(cache_lens_ptr + b)
    bs = tl.load(block_start_ptr + b)
    n_pre = tl.minimum(bs, cl)
    n_cached = n_pre + tl.maximum(cl - bs - L, 0)
    per_split = tl.cdiv(tl.cdiv(n_cached, BLOCK_N), num_splits)
    t_end = tl.minimum((split + 1) * per_split, tl.cdiv(n_cached, BLOCK_N))
    m_i = tl.full([BLOCK_L * G_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_L * G_P2], tl.float32)
    acc = tl.zeros([BLOCK_L * G_P2, D], tl.float32)
    for t in range(split * per_split, t_end):
        j = t * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = j < n_cached
        pos = tl.where(j < n_pre, j, j + (bs + L - n_pre))
        # Tiles may straddle pages: the physical page is looked up per token.
        page = tl.load(block_table_ptr + b * s_bt + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        k = tl.load(k_cache_ptr + (page * s_kp + slot * s_ks + kvh * s_kh)[:, None] + d[None, :] * s_kd,
                    mask=ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + (page * s_vp + slot * s_vs + kvh * s_vh)[:, None] + d[None, :] * s_vd,
                    mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _attend(q, k, v, ok, m_i, l_i, acc, scale_log2, DOT_F32)

    if split == num_splits - 1:
        # Fresh keys come from k_new (rotated here), never from the cache that this launch is writing.
        for f0 in range(0, L, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_ok = f < L
            kf = _load_rope(k_new_ptr + b * s_knb, f * s_knl + kvh * s_knh, s_knd, cos_ptr, sin_ptr, (b * L + f) * D,
                            f_ok, D, ROPE).to(k_cache_ptr.dtype.element_ty)
            vf = tl.load(v_new_ptr + b * s_vnb + (f * s_vnl + kvh * s_vnh)[:, None] + d[None, :] * s_vnd,
                         mask=f_ok[:, None], other=0.0)
            if WRITE_CACHE:
                if lt == 0:
                    wpage = tl.load(block_table_ptr + b * s_bt + (bs + f) // PAGE_SIZE, mask=f_ok, other=0)
                    wslot = (bs + f) % PAGE_SIZE
                    tl.store(k_cache_ptr + (wpage.to(tl.int64) * s_kp + wslot * s_ks + kvh * s_kh)[:, None]
                             + d[None, :] * s_kd, kf, mask=f_ok[:, None])
                    tl.store(v_cache_ptr + (wpage.to(tl.int64) * s_vp + wslot * s_vs + kvh * s_vh)[:, None]
                             + d[None, :] * s_vd, vf.to(v_cache_ptr.dtype.element_ty), mask=f_ok[:, None])
            m_i, l_i, acc = _attend(q, kf, vf, f_ok, m_i, l_i, acc, scale_log2, DOT_F32)

    # An empty split (no tiles, no fresh keys) leaves l = 0: zero output, lse = -inf, weight 0 in the combine.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_row = split * s_os + b * s_ob + tok * s_ol + h * s_oh
    tl.store(o_ptr + o_row[:, None] + d[None, :] * s_od, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    if STORE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + ((split * tl.num_programs(0) + b) * L + tok) * H + h, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(o_part_ptr, lse_ptr, out_ptr, L, H, num_splits, s_ob, s_ol, s_oh, s_od,
                           D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (b * L + token, head tile): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), exact. The
    partials are contiguous fp32 [splits, B * L, H, D], their lse [splits, B * L, H] (base 2)."""
    row = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    d = tl.arange(0, D)
    rows = tl.num_programs(0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(lse_ptr + (s * rows + row) * H + h, mask=h_ok, other=0.0))
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    w_sum = tl.zeros([BLOCK_H], tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(lse_ptr + (s * rows + row) * H + h, mask=h_ok, other=0.0) - m)
        o = tl.load(o_part_ptr + ((s * rows + row) * H + h)[:, None] * D + d[None, :], mask=h_ok[:, None], other=0.0)
        acc += w[:, None] * o
        w_sum += w
    out = acc / w_sum[:, None]
    o_row = (row // L) * s_ob + (row % L) * s_ol + h * s_oh
    tl.store(out_ptr + o_row[:, None] + d[None, :] * s_od, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])


def _check(q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin, out) -> None:
    check = Contract("q", q)
    check("q", q, KERNEL_FLOATS, ndim=4, dims="[batch, block_len, heads, head_dim]")
    B, L, H, D = q.shape
    if k_new.ndim != 4 or k_new.shape[:2] != (B, L) or k_new.shape[3] != D or v_new.shape != k_new.shape:
        raise ValueError(f"k_new and v_new must both be [{B}, {L}, kv_heads, {D}] like q, got shapes "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}.")
    KV = k_new.shape[2]
    if KV == 0 or H % KV:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of kv heads ({KV}).")
    if D % 2 or D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head_dim must be even (rotate-half RoPE) and a power of two in [16, 256], got {D}.")
    if k_cache.ndim != 4 or k_cache.shape[2:] != (KV, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_pages, page_size, {KV}, {D}], got shapes "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}.")
    same_dtype({"q": q, "k_new": k_new, "v_new": v_new, "k_cache": k_cache, "v_cache": v_cache}, KERNEL_FLOATS)
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        check(name, t)
    check("block_table", block_table, torch.int32, ndim=2, dims="[B, max_pages]", length=(B, "B, as q"))
    for name, t in (("cache_lens", cache_lens), ("block_start", block_start)):
        check(name, t, torch.int32, ndim=1, dims="[B]", length=(B, "B, as q"))
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin come together (RoPE in the kernel) or are both None (q and k rotated already).")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None:
            check(name, t, FLOATING, shape=(B, L, D), dims="[B, L, D]")
    if out is not None:
        check("out", out, q.dtype, shape=tuple(q.shape), dims="[B, L, H, D]")


def block_attention_cached(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_table: torch.Tensor, cache_lens: torch.Tensor,
                           block_start: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, *,
                           write_cache: bool = False, num_splits: int | None = None, scale: float | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention of a block's queries q ``[B, L, H, D]`` (pre-RoPE) over the keys at logical
    positions ``[0, min(block_start, cache_len))`` and ``[block_start + L, cache_len)`` of the paged cache
    ``k_cache`` / ``v_cache`` ``[num_pages, page_size, KV, D]`` (post-RoPE; logical page i of request b is
    ``block_table[b, i]``) plus the block's own keys k_new / v_new ``[B, L, KV, D]`` (k pre-RoPE). A cache_len
    below block_start + L is allowed: the suffix is then empty (prefix cache), and stale cache slots inside the
    block's range are never read. cos / sin ``[B, L, D]`` are the RoPE tables of the block tokens (cast to fp32);
    both None when q and k_new are rotated already (no rotation in the kernel).
    ``write_cache`` stores the rotated k_new and v_new at positions [block_start, block_start + L); the caller
    guarantees that every page touched (read or written) is mapped. ``num_splits`` divides each request's cached
    keys for small batches (None: chosen from the batch, kv heads and cache size). Returns ``[B, L, H, D]``."""
    _check(q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin, out)
    B, L, H, D = q.shape
    KV = k_new.shape[2]
    page_size = k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    if q.numel() == 0:
        return out
    g_p2 = triton.next_power_of_2(H // KV)
    # At least 16 rows for tl.dot; at most _MAX_ROWS, else the L tokens are tiled (each tile re-reads K/V).
    block_l = max(min(triton.next_power_of_2(L), max(_MAX_ROWS // g_p2, 1)), max(16 // g_p2, 1))
    num_l_tiles = triton.cdiv(L, block_l)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else _NOMINAL_SMS
        programs = B * KV * num_l_tiles
        # The block table's capacity bounds the cached length without reading cache_lens back from the device.
        tiles = triton.cdiv(block_table.shape[1] * page_size, _BLOCK_N)
        num_splits = 1 if programs >= sms else max(1, min(triton.cdiv(2 * sms, programs), tiles // 4, 16))
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}.")
    rope = cos is not None
    if rope:
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
    else:
        cos = sin = q  # unused pointers
    block_table, cache_lens, block_start = block_table.contiguous(), cache_lens.contiguous(), block_start.contiguous()
    if num_splits == 1:
        o, lse, s_o = out, out, (0,) + out.stride()
    else:
        o = torch.empty((num_splits, B, L, H, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((num_splits, B, L, H), device=q.device, dtype=torch.float32)
        s_o = o.stride()
    rows = block_l * g_p2
    # bf16 tl.dot is wrong under the CPU interpreter; fp32 inputs keep ~fp32 precision (3-pass TF32 on tensor
    # cores: plain fp32 FMA dots spill registers badly) and use one pipeline stage to fit in shared memory.
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    _block_attn_cached_kernel[(B, KV, num_splits * num_l_tiles)](
        q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin, o, lse,
        L, H // KV, H, num_splits, num_l_tiles, scale * math.log2(math.e),
        *q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
        *s_o,
        D=D, PAGE_SIZE=page_size, BLOCK_L=block_l, G_P2=g_p2, BLOCK_N=_BLOCK_N,
        BLOCK_F=_BLOCK_F, WRITE_CACHE=write_cache, STORE_LSE=num_splits > 1, DOT_F32=dot_f32,
        ROPE=rope, num_warps=4 if rows * D <= 32 * 128 else 8, num_stages=1 if q.dtype == torch.float32 else 2,
    )
    if num_splits > 1:
        block_h = min(triton.next_power_of_2(H), 32)
        _combine_splits_kernel[(B * L, triton.cdiv(H, block_h))](
            o, lse, out, L, H, num_splits, *out.stride(), D=D, BLOCK_H=block_h, num_warps=4)
    return out
