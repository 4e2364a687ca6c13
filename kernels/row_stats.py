"""Per-row sampling statistics of existing logits (Gumbel-max token, its probability, top-1, margin, negative
entropy, invalid flag) for a list of selected rows; its reference is ``kernels.reference.row_stats_reference``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import KERNEL_FLOATS, Contract
from .noise_tl import gumbel, row_key

STREAM_SAMPLE = tl.constexpr(1)  # reference.STREAM_SAMPLE: Gumbel noise of token sampling
# Elements per program tile: a whole vocabulary tile of one row for real vocabularies, several rows of a small
# vocabulary per program (the tile never depends on M, so a row's statistics do not depend on its batch).
_TILE = 4096
_KEYS = ("token", "prob", "top1", "margin", "neg_entropy", "invalid")


@triton.jit
def _row_stats_kernel(
    logits_ptr, rows_ptr, temp_ptr, seed_ptr, step_ptr, pos_ptr, raw_ptr, excl_ptr,  # [R, V], [M] x 6, [M, K]
    token_ptr, prob_ptr, top1_ptr, margin_ptr, negent_ptr, invalid_ptr,  # outputs, each [M]
    M, V, stride_lr, stride_em,
    K: tl.constexpr, HAS_RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program: BLOCK_M selected rows, one pass over their vocabulary in tiles of BLOCK_V columns that
    merges the running max m, s = sum e^(c-m), w = sum e^(c-m)(c-m), the second-largest confidence logit and
    the Gumbel winner. Every merge is exact in max/argmax, so tokens do not depend on the tile size."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    row = tl.load(rows_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    temp = tl.load(temp_ptr + offs_m, mask=row_ok, other=0.0)
    hot = temp > 0
    any_hot = tl.max(hot.to(tl.int32), axis=0) > 0
    t_div = tl.where(hot, temp, 1.0)
    key = row_key(tl.load(seed_ptr + offs_m, mask=row_ok, other=0), tl.load(step_ptr + offs_m, mask=row_ok, other=0),
                  tl.load(pos_ptr + offs_m, mask=row_ok, other=0), STREAM_SAMPLE)
    if HAS_RAW:
        raw = tl.load(raw_ptr + offs_m, mask=row_ok, other=0) != 0
    base = logits_ptr + row[:, None] * stride_lr

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_M], tl.float32)
    second = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)  # Gumbel winner: perturbed score, column, confidence logit
    best_col = tl.zeros([BLOCK_M], tl.int32)  # stays 0 when every score is -inf, as torch.argmax
    best_c = tl.full([BLOCK_M], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_M], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        # The only large read: each selected row's logits once. Cast at once (bf16 math is wrong in the
        # interpreter, and fp32 costs nothing in a memory-bound pass); padding columns read as -inf.
        x = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        z = x / t_div[:, None]
        if any_hot:
            zg = tl.where(hot[:, None], z + gumbel(key[:, None], cols[None, :]), z)
        else:  # greedy programs skip the hash and the two logs per element
            zg = z
        c = z
        if HAS_RAW:
            xe = x
            for k in tl.static_range(K):
                ex = tl.load(excl_ptr + offs_m * stride_em + k, mask=row_ok, other=-1)
                xe = tl.where(cols[None, :] == ex[:, None], float("-inf"), xe)
            c = tl.where(raw[:, None], xe, z)
        bad = tl.maximum(bad, tl.max(((c != c) | (c == float("inf"))).to(tl.int32), axis=1))

        # Gumbel winner of the tile; a strictly larger score replaces the running one, so ties keep the
        # smallest column (tiles run in column order).
        t_best = tl.max(zg, axis=1)
        t_col = tl.min(tl.where(zg == t_best[:, None], cols[None, :], V), axis=1)
        t_c = tl.max(tl.where(cols[None, :] == t_col[:, None], c, float("-inf")), axis=1)
        take = t_best > best
        best = tl.where(take, t_best, best)
        best_col = tl.where(take, t_col, best_col)
        best_c = tl.where(take, t_c, best_c)

        # Second largest of the union: the larger of both second-largests and the smaller of both maxima
        # (a repeated maximum counts twice, as torch.topk).
        t_max = tl.max(c, axis=1)
        t_arg = tl.min(tl.where(c == t_max[:, None], cols[None, :], V), axis=1)
        t_second = tl.max(tl.where(cols[None, :] == t_arg[:, None], float("-inf"), c), axis=1)
        second = tl.maximum(tl.maximum(second, t_second), tl.minimum(m, t_max))

        # Rescale against m_use = 0 while every entry seen is -inf, so that -inf - -inf never makes NaN;
        # e^(-inf) = 0 entries add 0 to w instead of 0 * -inf.
        m_new = tl.maximum(m, t_max)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        shift = tl.where(m == float("-inf"), 0.0, m - m_use)
        e = tl.exp(c - m_use[:, None])
        w = alpha * (w + s * shift) + tl.sum(e * tl.where(e > 0, c - m_use[:, None], 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    invalid = (bad != 0) | (m == float("-inf"))
    # Invalid rows compute on m = w = 0, s = 1 and store NaN: no inf - inf or 0 / 0 on the way.
    m = tl.where(invalid, 0.0, m)
    s = tl.where(invalid, 1.0, s)
    w = tl.where(invalid, 0.0, w)
    nan = float("nan")
    tl.store(token_ptr + offs_m, tl.where(invalid, -1, best_col.to(tl.int64)), mask=row_ok)
    tl.store(prob_ptr + offs_m, tl.where(invalid, nan, tl.exp(best_c - m) / s), mask=row_ok)
    tl.store(top1_ptr + offs_m, tl.where(invalid, nan, 1.0 / s), mask=row_ok)
    tl.store(margin_ptr + offs_m, tl.where(invalid, nan, (1.0 - tl.exp(second - m)) / s), mask=row_ok)
    tl.store(negent_ptr + offs_m, tl.where(invalid, nan, w / s - tl.log(s)), mask=row_ok)
    tl.store(invalid_ptr + offs_m, invalid.to(tl.int32), mask=row_ok)


def row_stats(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
              step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor | None = None,
              conf_exclude: torch.Tensor | None = None, block_v: int | None = None,
              out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Sample a token from and score each row ``logits[rows[i]]``, reading those M rows once.

    logits ``[R, V]`` fp32/fp16/bf16 with a contiguous last dimension (any row stride); ``rows`` int64/int32
    ``[M]`` (repeats and any order; out-of-range indices are not checked, as that would synchronise);
    ``temperature`` fp32, ``seed`` / ``step`` / ``position`` int64, ``raw_confidence`` bool, each ``[M]``;
    ``conf_exclude`` int64 ``[M, K]`` (K <= 4, entries < 0 unused) for the raw-confidence rows. ``block_v``:
    vocabulary tile (a power of two; default 4096). Returns (or fills ``out`` with) ``token`` int64, ``prob``,
    ``top1``, ``margin``, ``neg_entropy`` fp32 and ``invalid`` int32, each ``[M]``; invalid rows (NaN, +inf
    or no finite confidence logit) get token -1 and NaN scores.

    Traffic: M * V logits read once (2 B each for bf16: 311 MB for M = 1024, V = 152064) plus ~50 B per row of
    arguments and outputs; the Gumbel noise is hashed in registers, never stored."""
    check = Contract("logits", logits)
    check("logits", logits, KERNEL_FLOATS, ndim=2, dims="[R, V]", last_dim_contiguous=True)
    device, v = logits.device, logits.shape[1]
    m = check("rows", rows, (torch.int64, torch.int32), ndim=1, dims="[M]").shape[0]
    per_row = {"temperature": (temperature, torch.float32), "seed": (seed, torch.int64), "step": (step, torch.int64),
               "position": (position, torch.int64)}
    if raw_confidence is not None:
        per_row["raw_confidence"] = (raw_confidence, torch.bool)
    for name, (t, dtype) in per_row.items():
        check(name, t, dtype, ndim=1, dims="[M]", length=(m, "M, as rows"))
    if conf_exclude is not None:
        if conf_exclude.ndim == 1:
            conf_exclude = conf_exclude[:, None]
        check("conf_exclude", conf_exclude, torch.int64, ndim=2, dims="[M, K]", length=(m, "M, as rows"))
        if conf_exclude.shape[1] > 4:
            raise ValueError(f"conf_exclude holds at most 4 columns per row; got {conf_exclude.shape[1]}.")
    # Exclusions apply to raw-confidence rows only (as in the reference): without those there is nothing to do.
    k = conf_exclude.shape[1] if conf_exclude is not None and raw_confidence is not None else 0
    block_v = _TILE if block_v is None else block_v
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two; got {block_v}.")
    if out is None:
        out = {key: torch.empty(m, dtype=torch.float32, device=device) for key in _KEYS}
        out["token"] = torch.empty(m, dtype=torch.int64, device=device)
        out["invalid"] = torch.empty(m, dtype=torch.int32, device=device)
    else:
        if set(out) != set(_KEYS):
            raise ValueError(f"out must be a dict with the keys {', '.join(_KEYS)}; got {', '.join(out)}.")
        for key, t in out.items():
            want = {"token": torch.int64, "invalid": torch.int32}.get(key, torch.float32)
            check(f"out[{key!r}]", t, want, ndim=1, dims="[M]", length=(m, "M, as rows"), contiguous=True)
    if m == 0:
        return out
    if v == 0:
        raise ValueError("logits must have at least one column.")

    # Tiles of at least 16 columns (narrower ones waste lanes); small vocabularies pack rows into the tile.
    block = min(block_v, max(16, triton.next_power_of_2(v)))
    block_m = max(1, _TILE // block)
    if not logits.is_cuda:
        # The CPU interpreter pays per operation, not per element: pack up to 16x more rows, but no more than
        # the batch has (it reduces each row on its own, so this changes no result).
        block_m = min(max(1, 16 * _TILE // block), triton.next_power_of_2(m))
    # Per-row arguments are a few bytes per row: make them dense (a no-op for the usual contiguous inputs).
    rows, temperature, seed, step, position = (t.contiguous() for t in (rows, temperature, seed, step, position))
    raw = raw_confidence.contiguous().view(torch.uint8) if raw_confidence is not None else rows  # bool as bytes
    excl = conf_exclude.contiguous() if k else rows  # unused pointers when the constexpr flags are off
    grid = (triton.cdiv(m, block_m),)
    _row_stats_kernel[grid](
        logits, rows, temperature, seed, step, position, raw, excl,
        out["token"], out["prob"], out["top1"], out["margin"], out["neg_entropy"], out["invalid"],
        m, v, logits.stride(0), excl.stride(0),
        K=k, HAS_RAW=raw_confidence is not None, BLOCK_M=block_m, BLOCK_V=block,
        num_warps=8 if block_m * block >= _TILE else 4,
    )
    return out
