"""Fused LM head + sampling statistics: folds the logits ``hidden[rows] @ weight.T``, tile by tile and never written,
into the sampled token, prob, top1, margin and neg_entropy; its reference is ``row_stats_reference`` on fp64 logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import FLOATING, INTEGER, KERNEL_FLOATS, Contract, same_dtype
from .noise_tl import gumbel, row_key

STREAM_SAMPLE = tl.constexpr(1)  # kernels/reference.py: the Gumbel stream of token sampling
NOMINAL_SMS = 132  # H100 SXM; the default split count aims at two programs per SM


@triton.jit
def _combine(m_a, s_a, w_a, c1_a, c2_a, g_a, i_a, cw_a, m_b, s_b, w_b, c1_b, c2_b, g_b, i_b, cw_b):
    """Exact merge of two partial states over disjoint columns: m = max c, s = sum e^(c-m), w = sum e^(c-m) (c-m);
    c1 >= c2 the top two c (a repeated maximum counts twice); g, i, cw: the best noisy score, its column (ties to
    the smaller column) and c there."""
    m = tl.maximum(m_a, m_b)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # no finite entry yet: e^(-inf - 0) = 0 instead of NaN
    e_a = tl.exp(m_a - m_use)
    e_b = tl.exp(m_b - m_use)
    # An empty side has s = w = 0 and m = -inf: its shift must not turn 0 * inf into NaN.
    d_a = tl.where(s_a > 0, m_a - m_use, 0.0)
    d_b = tl.where(s_b > 0, m_b - m_use, 0.0)
    s = s_a * e_a + s_b * e_b
    w = e_a * (w_a + s_a * d_a) + e_b * (w_b + s_b * d_b)
    c1 = tl.maximum(c1_a, c1_b)
    c2 = tl.maximum(tl.minimum(c1_a, c1_b), tl.maximum(c2_a, c2_b))
    b_wins = (g_b > g_a) | ((g_b == g_a) & (i_b < i_a))
    return (m, s, w, c1, c2, tl.where(b_wins, g_b, g_a), tl.where(b_wins, i_b, i_a), tl.where(b_wins, cw_b, cw_a))


@triton.jit
def _empty_state(BLOCK: tl.constexpr):
    """The state of no column: m = c1 = c2 = g = cw = -inf, s = w = 0, no winner (index 2**31 - 1), not bad."""
    ninf = tl.full([BLOCK], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK], tl.float32)
    return ninf, zero, zero, ninf, ninf, ninf, tl.full([BLOCK], 2147483647, tl.int32), ninf, tl.zeros([BLOCK], tl.int32)


@triton.jit
def _lm_head_stats_kernel(
    h_ptr, w_ptr, rows_ptr, temp_ptr, seed_ptr, step_ptr, pos_ptr, raw_ptr, excl_ptr,  # see the launcher
    part_f_ptr, part_i_ptr,  # scratch [7, S, M] fp32 and [2, S, M] int32
    M, V, D, tiles_per_split, num_splits,
    stride_hr, stride_hd, stride_wv, stride_wd, stride_em, stride_ek,
    HAS_RAW: tl.constexpr, EXCL_K: tl.constexpr, CAST_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """BLOCK_M selected rows x the vocabulary tiles of split ``program_id(1)``: each weight tile read once for all."""
    split = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    hrow = tl.load(rows_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    temp = tl.load(temp_ptr + offs_m, mask=row_ok, other=0.0)
    t_div = tl.where(temp > 0, temp, 1.0)
    key = row_key(tl.load(seed_ptr + offs_m, mask=row_ok, other=0), tl.load(step_ptr + offs_m, mask=row_ok, other=0),
                  tl.load(pos_ptr + offs_m, mask=row_ok, other=0), STREAM_SAMPLE)
    if HAS_RAW:
        raw = tl.load(raw_ptr + offs_m, mask=row_ok, other=0) != 0
    h_base = h_ptr + hrow[:, None] * stride_hr
    m, s, w, c1, c2, g, idx, cw, bad = _empty_state(BLOCK_M)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            h = tl.load(h_base + kk[None, :] * stride_hd, mask=row_ok[:, None] & (kk[None, :] < D), other=0.0)
            # int64 column offsets: V * D may pass 2**31.
            wt = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wv + kk[None, :] * stride_wd,
                         mask=col_ok[:, None] & (kk[None, :] < D), other=0.0)
            if CAST_FP32:
                acc = tl.dot(h.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(wt), acc)
        # Epilogue: O(BLOCK_M * BLOCK_V) work against the dot's O(BLOCK_M * BLOCK_V * D).
        z = acc / t_div[:, None]
        noisy = tl.where(temp[:, None] > 0, z + gumbel(key[:, None], cols[None, :]), z)
        noisy = tl.where(col_ok[None, :], noisy, float("-inf"))
        c = z
        if HAS_RAW:
            x = acc
            for k in tl.static_range(EXCL_K):
                ex = tl.load(excl_ptr + offs_m * stride_em + k * stride_ek, mask=row_ok, other=-1)
                x = tl.where(cols[None, :] == ex[:, None], float("-inf"), x)
            c = tl.where(raw[:, None], x, z)
        c = tl.where(col_ok[None, :], c, float("-inf"))
        bad = tl.maximum(bad, tl.max(((c != c) | (c == float("inf"))).to(tl.int32), 1))
        t_m = tl.max(c, 1)
        t_mu = tl.where(t_m == float("-inf"), 0.0, t_m)
        p = tl.exp(c - t_mu[:, None])
        t_s = tl.sum(p, 1)
        t_w = tl.sum(p * tl.where(p > 0, c - t_mu[:, None], 0.0), 1)  # 0 * (-inf) would be NaN
        i1 = tl.min(tl.where(c == t_m[:, None], cols[None, :], 2147483647), 1)
        t_c2 = tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), c), 1)
        t_g = tl.max(noisy, 1)
        t_i = tl.min(tl.where(noisy == t_g[:, None], cols[None, :], 2147483647), 1)
        t_cw = tl.sum(tl.where(cols[None, :] == t_i[:, None], c, 0.0), 1)
        m, s, w, c1, c2, g, idx, cw = _combine(m, s, w, c1, c2, g, idx, cw, t_m, t_s, t_w, t_m, t_c2, t_g, t_i, t_cw)

    plane = num_splits * M
    out = split * M + offs_m
    tl.store(part_f_ptr + out, m, mask=row_ok)
    tl.store(part_f_ptr + plane + out, s, mask=row_ok)
    tl.store(part_f_ptr + 2 * plane + out, w, mask=row_ok)
    tl.store(part_f_ptr + 3 * plane + out, c1, mask=row_ok)
    tl.store(part_f_ptr + 4 * plane + out, c2, mask=row_ok)
    tl.store(part_f_ptr + 5 * plane + out, g, mask=row_ok)
    tl.store(part_f_ptr + 6 * plane + out, cw, mask=row_ok)
    tl.store(part_i_ptr + out, idx, mask=row_ok)
    tl.store(part_i_ptr + plane + out, bad, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_f_ptr, part_i_ptr,  # scratch of the main kernel
    token_ptr, prob_ptr, top1_ptr, margin_ptr, negent_ptr, invalid_ptr,  # outputs [M]
    M, num_splits, BLOCK: tl.constexpr,
):
    """Merges the splits of BLOCK rows in split order (so ties go to the smaller column) and writes the outputs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    plane = num_splits * M
    m, s, w, c1, c2, g, idx, cw, bad = _empty_state(BLOCK)
    for j in range(0, num_splits):
        at = j * M + offs
        f = part_f_ptr + at
        m, s, w, c1, c2, g, idx, cw = _combine(
            m, s, w, c1, c2, g, idx, cw, tl.load(f, mask=ok, other=float("-inf")),
            tl.load(f + plane, mask=ok, other=0.0), tl.load(f + 2 * plane, mask=ok, other=0.0),
            tl.load(f + 3 * plane, mask=ok, other=float("-inf")), tl.load(f + 4 * plane, mask=ok, other=float("-inf")),
            tl.load(f + 5 * plane, mask=ok, other=float("-inf")), tl.load(part_i_ptr + at, mask=ok, other=2147483647),
            tl.load(f + 6 * plane, mask=ok, other=float("-inf")))
        bad = tl.maximum(bad, tl.load(part_i_ptr + plane + at, mask=ok, other=0))
    # NaN or +inf anywhere, or no finite entry (m = -inf): the reference flags the row instead of raising.
    invalid = (bad != 0) | (m == float("-inf"))
    m = tl.where(invalid, 0.0, m)  # also for the masked lanes past M: no inf - inf
    s = tl.where(invalid, float("nan"), s)  # the reference's NaN scores follow from s
    tl.store(token_ptr + offs, tl.where(invalid, -1, idx.to(tl.int64)), mask=ok)
    tl.store(prob_ptr + offs, tl.exp(cw - m) / s, mask=ok)
    tl.store(top1_ptr + offs, 1.0 / s, mask=ok)
    tl.store(margin_ptr + offs, 1.0 / s - tl.exp(c2 - m) / s, mask=ok)
    tl.store(negent_ptr + offs, w / s - tl.log(s), mask=ok)
    tl.store(invalid_ptr + offs, invalid.to(tl.int32), mask=ok)


def _tiles(m: int, v: int, d: int, fp32: bool, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages). On the GPU 64 rows share each weight tile (16 for a few
    rows, weight-bound anyway); fp32 halves BLOCK_K to keep three stages in shared memory. The interpreter runs
    whole blocks as numpy arrays: there fewer, larger programs are faster."""
    block_k = min(32 if fp32 and on_gpu else 64, triton.next_power_of_2(d))
    if not on_gpu:
        return 64, min(512, max(16, triton.next_power_of_2(v))), block_k, 1, 1
    block_m = 16 if m <= 16 else 64
    return block_m, 128, block_k, 4 if block_m == 16 else 8, 3


def lm_head_stats(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, *,
                  raw_confidence: torch.Tensor | None = None, conf_exclude: torch.Tensor | None = None,
                  num_splits: int | None = None, block_m: int | None = None,
                  block_v: int | None = None) -> dict[str, torch.Tensor]:
    """``row_stats_reference(hidden[rows] @ weight.T, arange(M), ...)`` without materialising the logits.

    hidden ``[R, D]`` and weight ``[V, D]`` (one dtype of fp16, bf16, fp32; D >= 16); ``rows`` int32/int64 ``[M]``
    indices into hidden (not range-checked: that would synchronise); per row ``[M]``: ``temperature`` (float),
    ``seed``, ``step``, ``position`` (integers), ``raw_confidence`` (bool, None = all False), ``conf_exclude``
    ``[M, K]`` integer columns (K <= 4, entries < 0 unused, used only where raw_confidence). The logits
    accumulate in fp32. ``num_splits`` vocabulary ranges per row tile (None: about two programs per SM);
    ``block_m`` / ``block_v`` override the tiles (powers of two >= 16). Returns token (int64), prob, top1,
    margin, neg_entropy (fp32) and invalid (int32), each ``[M]``."""
    check = Contract("hidden", hidden)
    check("hidden", hidden, ndim=2, dims="[rows, D]")
    check("weight", weight, ndim=2, dims="[vocab, D]")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [rows, D] and weight [vocab, D]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}.")
    same_dtype({"hidden": hidden, "weight": weight}, KERNEL_FLOATS)
    v, d = weight.shape
    if d < 16 or not 1 <= v < 2**31:
        raise ValueError(f"the hidden size must be at least 16 (the tl.dot minimum) and the vocabulary 1 to 2**31 - 1 "
                         f"columns; got D = {d}, V = {v}.")
    mm = check("rows", rows, (torch.int32, torch.int64), ndim=1, dims="[M]").shape[0]
    per_row = {"temperature": (temperature, FLOATING), "seed": (seed, INTEGER), "step": (step, INTEGER),
               "position": (position, INTEGER)}
    if raw_confidence is not None:
        per_row["raw_confidence"] = (raw_confidence, torch.bool)
    for name, (t, dtype) in per_row.items():
        check(name, t, dtype, ndim=1, dims="[M]", length=(mm, "M, as rows"))
    if conf_exclude is not None:
        conf_exclude = conf_exclude.reshape(mm, -1) if conf_exclude.ndim == 1 else conf_exclude
        check("conf_exclude", conf_exclude, INTEGER, ndim=2, dims="[M, K]", length=(mm, "M, as rows"))
        if conf_exclude.shape[1] > 4:
            raise ValueError(f"conf_exclude must be [{mm}, K] with K <= 4; got {tuple(conf_exclude.shape)}.")
    if (num_splits is not None and num_splits < 1) or any(b is not None and (b < 16 or b & (b - 1))
                                                          for b in (block_m, block_v)):
        raise ValueError(f"num_splits must be positive and block_m, block_v powers of two >= 16; got {num_splits}, "
                         f"{block_m}, {block_v}.")

    dev = hidden.device
    dtypes = {"token": torch.int64, **dict.fromkeys(("prob", "top1", "margin", "neg_entropy"), torch.float32),
              "invalid": torch.int32}
    out = {k: torch.empty(mm, dtype=dt, device=dev) for k, dt in dtypes.items()}
    if mm == 0:
        return out
    on_gpu = dev.type == "cuda"
    # bf16 tl.dot is wrong under the interpreter, so off the GPU every tile is cast to fp32; fp32 inputs use IEEE
    # fp32 products (no TF32); fp16 and bf16 on the GPU use the tensor cores with fp32 accumulation.
    cast_fp32 = hidden.dtype == torch.float32 or not on_gpu
    bm, bv, bk, num_warps, num_stages = _tiles(mm, v, d, hidden.dtype == torch.float32, on_gpu)
    bm, bv = block_m or bm, block_v or bv
    m_tiles, v_tiles = triton.cdiv(mm, bm), triton.cdiv(v, bv)
    splits = num_splits or triton.cdiv(2 * NOMINAL_SMS, m_tiles)
    per_split = triton.cdiv(v_tiles, min(splits, v_tiles))
    splits = triton.cdiv(v_tiles, per_split)  # no split left without a tile
    # Partial state per split and row: (m, s, w, c1, c2, g, c_win) in fp32, (winner column, bad) in int32.
    part_f = torch.empty(7, splits, mm, dtype=torch.float32, device=dev)
    part_i = torch.empty(2, splits, mm, dtype=torch.int32, device=dev)
    temp = temperature.to(torch.float32).contiguous()
    seed, step, position = (t.to(torch.int64).contiguous() for t in (seed, step, position))
    # bool and uint8 share one byte per entry: the kernel tests bytes against 0.
    raw = raw_confidence.contiguous().view(torch.uint8) if raw_confidence is not None else temp
    excl = conf_exclude.to(torch.int64) if conf_exclude is not None and raw_confidence is not None else None
    _lm_head_stats_kernel[(m_tiles, splits)](
        hidden, weight, rows.contiguous(), temp, seed, step, position, raw, seed if excl is None else excl,
        part_f, part_i, mm, v, d, per_split, splits,
        *hidden.stride(), *weight.stride(), *((0, 0) if excl is None else excl.stride()),
        HAS_RAW=raw_confidence is not None, EXCL_K=0 if excl is None else excl.shape[1], CAST_FP32=cast_fp32,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages,
    )
    merge_block = 128 if on_gpu else 4096
    _merge_kernel[(triton.cdiv(mm, merge_block),)](
        part_f, part_i, out["token"], out["prob"], out["top1"], out["margin"], out["neg_entropy"], out["invalid"],
        mm, splits, BLOCK=merge_block,
    )
    return out
