"""Pure-torch references of every op in ``diffuse_engine.kernels`` and ``csrc/``.

These are the semantics that the Triton and CUDA kernels must reproduce; the engine runs them directly on
CPU tensors (see ``diffuse_engine/ops/``).

Counter-based noise
-------------------
Every random number the engine draws is a pure function of ``(seed, step, position, stream, column)``, so a
request's samples do not depend on the batch it runs in, on tiling, or on the backend. The hash is
``lowbias32`` (a 32-bit integer finaliser) chained over the key words::

    h = H(seed_lo); h = H(h ^ seed_hi); h = H(h ^ step); h = H(h ^ position); h = H(h ^ stream)
    bits(column) = H(h ^ H(column ^ 0xA511E9B3))
    u = ((bits >> 9) + 0.5) * 2**-23          # 23 random bits, u in (0, 1), exact in fp32

with all arithmetic modulo 2**32. A per-position uniform (no vocabulary axis) is column 0. Gumbel noise is
``-log(-log(u))`` in fp32: u is at most 1 - 2**-24, so neither log reaches 0 or infinity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..commit_batch import CommitBatch

MASK32 = 0xFFFFFFFF
COLUMN_SALT = 0xA511E9B3

# Noise streams: which decision a random number is for.
STREAM_SAMPLE = 1  # Gumbel noise of token sampling, one per vocabulary column
STREAM_REMASK = 2  # LLaDA 'random' remasking: the per-position confidence
STREAM_TRANSFER = 3  # Dream 'origin': the per-position coin that decides whether it is unmasked
STREAM_ORDER = 4  # Dream alg_temp: Gumbel noise for sampling positions without replacement
STREAM_REVISE = 5  # ReMDM: the per-position coin that re-masks a committed token


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    return (x - ((x >> 31) & 1) * (1 << 32)).to(torch.int32)


def _i32_const(v: int) -> int:
    return v - (1 << 32) if v >= (1 << 31) else v


_M1 = _i32_const(0x7FEB352D)
_M2 = _i32_const(0x846CA68B)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 finaliser on int32 tensors holding uint32 bit patterns (multiplication wraps mod 2**32;
    right shifts are made logical by masking)."""
    if x.dtype != torch.int32:
        raise TypeError("lowbias32 works on int32 bit patterns")
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def row_keys(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """The per-row hash state ``h`` (int32 bit patterns) for int64 tensors of equal shape.
    ``seed`` holds uint64 values as int64 bit patterns; ``step`` and ``position`` are in [0, 2**32)."""
    seed = seed.to(torch.int64)
    lo = _to_i32(seed & MASK32)
    hi = _to_i32((seed >> 32) & MASK32)
    h = lowbias32(lo)
    h = lowbias32(h ^ hi)
    h = lowbias32(h ^ _to_i32(step.to(torch.int64) & MASK32))
    h = lowbias32(h ^ _to_i32(position.to(torch.int64) & MASK32))
    return lowbias32(h ^ _i32_const(stream & MASK32))


def column_hashes(num_cols: int, device: torch.device | str = "cpu", first_col: int = 0) -> torch.Tensor:
    cols = torch.arange(first_col, first_col + num_cols, device=device, dtype=torch.int32)
    return lowbias32(cols ^ _i32_const(COLUMN_SALT))


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns (int32 tensor) -> fp32 uniforms ((bits >> 9) + 0.5) * 2**-23."""
    return (((bits >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (2.0 ** -23)


def counter_uniform(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int,
                    num_cols: int | None = None, first_col: int = 0) -> torch.Tensor:
    """Uniforms in (0, 1), fp32: ``[M]`` when ``num_cols`` is None (column 0), else ``[M, num_cols]`` for the
    columns ``first_col .. first_col + num_cols - 1`` (a slice of the vocabulary draws the same numbers as the
    matching columns of the whole)."""
    h = row_keys(seed, step, position, stream)
    if num_cols is None:
        return bits_to_uniform(lowbias32(h ^ column_hashes(1, h.device)[0]))
    return bits_to_uniform(lowbias32(h[:, None] ^ column_hashes(num_cols, h.device, first_col)[None, :]))


def counter_gumbel(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int,
                   num_cols: int | None = None, first_col: int = 0) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` of :func:`counter_uniform`, fp32."""
    return -torch.log(-torch.log(counter_uniform(seed, step, position, stream, num_cols, first_col)))


# ----------------------------------------------------------------------------------------------- sampling
def filter_logits(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, *, any_top_p: bool | None = None,
                  any_top_k: bool | None = None) -> torch.Tensor:
    """Dream's ``top_p_logits`` then ``top_k_logits``, per row (top_p >= 1 and top_k <= 0 disable them).
    Removed entries get the dtype's lowest finite value, as in the published code. ``any_top_p`` / ``any_top_k``:
    whether any row uses each filter, when the caller knows (None: read from the tensors, a host synchronisation on
    CUDA); a filter that no row uses leaves the logits unchanged either way."""
    low = torch.finfo(z.dtype).min
    if any_top_p if any_top_p is not None else bool((top_p < 1).any()):
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1)
        remove = cum > top_p[:, None].to(cum.dtype)
        remove[:, 1:] = remove[:, :-1].clone()
        remove[:, 0] = False
        remove &= (top_p < 1)[:, None]
        z = z.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove), low)
    if any_top_k if any_top_k is not None else bool((top_k > 0).any()):
        k = top_k.clamp(min=1, max=z.shape[-1]).to(torch.int64)
        kth = torch.sort(z, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        z = z.masked_fill((z < kth) & (top_k > 0)[:, None], low)
    return z


def sample_and_score(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                     position: torch.Tensor, *, top_k: torch.Tensor | None = None,
                     top_p: torch.Tensor | None = None, raw_confidence: torch.Tensor | None = None,
                     conf_exclude: torch.Tensor | None = None,
                     scores: tuple[str, ...] = ("margin", "neg_entropy"),
                     entropy_eps: float = 1e-10) -> dict[str, torch.Tensor]:
    """Sample one token per row and score it.

    logits ``[M, V]`` (any float dtype; computed in fp32, or fp64 for fp64 input); per-row ``temperature``,
    ``seed``, ``step``, ``position`` ``[M]``; optional per-row ``top_k`` (<= 0: off), ``top_p`` (>= 1: off).

    The token is ``argmax(z)`` at temperature 0, else ``argmax(z + G)`` with counter-based Gumbel noise G
    (stream SAMPLE, one draw per vocabulary column), where ``z = filter(logits / T)`` (T = 1 when 0): an
    exact sample from ``softmax(z)``. Scores come from the confidence distribution q:
    ``softmax(z)`` (Dream), or, for rows with ``raw_confidence`` True, ``softmax(logits)`` with the columns
    ``conf_exclude[row]`` (``[M]`` or ``[M, K]``; entries < 0 are unused) set to -inf (LLaDA: raw logits, no
    temperature).

    Returns ``token`` (int64), ``prob`` = q[token], ``top1`` = max q, and those of ``scores`` that are asked
    for: ``margin`` = q1 - q2, ``neg_entropy`` = sum q * log(q + entropy_eps) (Dream's formula with its 1e-10;
    ``entropy_eps=0`` gives the exact sum q log q, 0 log 0 = 0, which the kernels compute); each ``[M]`` in the
    work dtype. A row whose logits contain NaN or +inf, or have no finite entry, raises ValueError.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}.")
    unknown = set(scores) - {"margin", "neg_entropy"}
    if unknown:
        raise ValueError(f"unknown scores {sorted(unknown)}; available: margin, neg_entropy.")
    m, v = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(work)
    temperature = temperature.to(device=x.device, dtype=work)
    hot = temperature > 0
    z = x / torch.where(hot, temperature, torch.ones_like(temperature))[:, None] if bool(hot.any()) else x
    if top_k is not None or top_p is not None:
        tk = top_k if top_k is not None else torch.zeros(m, dtype=torch.int64, device=x.device)
        tp = top_p if top_p is not None else torch.ones(m, dtype=work, device=x.device)
        z = filter_logits(z, tk.to(x.device), tp.to(device=x.device, dtype=work))
    noisy = z
    if bool(hot.any()):
        rows = hot.nonzero().squeeze(1)
        g = counter_gumbel(seed[rows], step[rows], position[rows], STREAM_SAMPLE, v).to(work)
        noisy = z.clone()
        noisy[rows] = z[rows] + g
    token = noisy.argmax(dim=-1)

    q_logits = z
    if raw_confidence is not None and bool(raw_confidence.any()):
        raw = x
        if conf_exclude is not None and bool((conf_exclude >= 0).any()):
            raw = x.clone()
            cols = conf_exclude.to(x.device).reshape(m, -1)
            rows, k = (cols >= 0).nonzero(as_tuple=True)
            raw[rows, cols[rows, k]] = float("-inf")
        q_logits = raw if bool(raw_confidence.all()) else torch.where(raw_confidence.to(x.device)[:, None], raw, z)
    # q = exp(q_logits - mx) / s, without materialising q unless the entropy needs it.
    mx = q_logits.max(dim=-1, keepdim=True).values
    e = torch.exp(q_logits - mx)
    s = e.sum(dim=-1)
    prob = e.gather(-1, token[:, None]).squeeze(1) / s
    top1 = 1.0 / s
    bad = ~(torch.isfinite(mx.squeeze(1)) & torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"sample_and_score: logits row {row} contains NaN or +inf, or has no finite entry.")
    out = {"token": token, "prob": prob, "top1": top1}
    if "margin" in scores:
        out["margin"] = top1 - (e.topk(2, dim=-1).values[:, 1] / s if v > 1 else 0.0)
    if "neg_entropy" in scores:
        q = e / s[:, None]
        out["neg_entropy"] = torch.special.xlogy(q, q + entropy_eps).sum(dim=-1)
    return out


# ------------------------------------------------------------------------------------ cached block attention
def block_attention_cached_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                                     k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                                     cache_lens: torch.Tensor, block_start: torch.Tensor, cos: torch.Tensor | None,
                                     sin: torch.Tensor | None, *, write_cache: bool = False, scale: float | None = None
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-causal attention of a diffusion block over a paged KV cache (``kernels/attention_cached.py``).

    q ``[B, L, H, D]`` and k_new ``[B, L, KV, D]`` are pre-RoPE, v_new ``[B, L, KV, D]``; cos / sin ``[B, L, D]``
    rotate them (rotate-half convention) in fp32, or fp64 for fp64 inputs, and the results are rounded back to
    the input dtype (both None: q and k_new are rotated already). ``k_cache`` / ``v_cache``
    ``[num_pages, page_size, KV, D]`` hold post-RoPE keys; logical position p of request b lives at page
    ``block_table[b, p // page_size]``, slot ``p % page_size``. Request b sees the cached positions
    ``[0, min(block_start, cache_len))`` and ``[block_start + L, cache_len)`` plus its L fresh keys;
    query head h uses kv head ``h // (H // KV)``. Scores and softmax are in the input dtype.

    Returns ``(out [B, L, H, D], k_cache_after, v_cache_after)``: clones of the caches, with the rotated k_new
    and v_new stored at positions [block_start, block_start + L) when ``write_cache``.
    """
    B, L, H, D = q.shape
    kv_heads = k_new.shape[2]
    page_size = k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    half = D // 2

    def rope(x: torch.Tensor, b: int) -> torch.Tensor:
        if cos is None:
            return x
        xw = x.to(work)
        c, s = cos[b, :, None, :].to(work), sin[b, :, None, :].to(work)
        return (xw * c + torch.cat((-xw[..., half:], xw[..., :half]), dim=-1) * s).to(x.dtype)

    k_after, v_after = k_cache.clone(), v_cache.clone()
    out = torch.empty_like(q)
    for b in range(B):
        cache_len, start = int(cache_lens[b]), int(block_start[b])
        qb, kb = rope(q[b], b), rope(k_new[b], b)
        table = block_table[b].to(torch.int64)

        def gather(cache: torch.Tensor, lo: int, hi: int, table: torch.Tensor = table) -> torch.Tensor:
            pos = torch.arange(lo, max(lo, hi), device=cache.device)
            return cache[table[pos // page_size], pos % page_size]

        keys = torch.cat((gather(k_cache, 0, min(start, cache_len)), kb, gather(k_cache, start + L, cache_len)))
        vals = torch.cat((gather(v_cache, 0, min(start, cache_len)), v_new[b],
                          gather(v_cache, start + L, cache_len)))
        keys = keys.repeat_interleave(H // kv_heads, dim=1)
        vals = vals.repeat_interleave(H // kv_heads, dim=1)
        scores = torch.einsum("lhd,nhd->hln", qb, keys) * scale
        out[b] = torch.einsum("hln,nhd->lhd", torch.softmax(scores, dim=-1), vals)
        if write_cache:
            pos = torch.arange(start, start + L, device=q.device)
            k_after[table[pos // page_size], pos % page_size] = kb
            v_after[table[pos // page_size], pos % page_size] = v_new[b]
    return out, k_after, v_after


# ------------------------------------------------------------------------------------------ packed attention
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | list[int], *,
                        block_size: int | None = None, key_valid: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """Attention within each packed sequence (``kernels/attention.py``), computed in the inputs' dtype.

    q ``[N, H, D]``, k and v ``[N, KV, D]`` (H a multiple of KV: query head h uses key/value head h // (H/KV));
    ``cu_seqlens`` ``[B+1]`` cumulative starts. A query of sequence b sees the keys of sequence b, only those of
    blocks <= its own with ``block_size`` (blocks of ``block_size`` positions from the sequence's first token),
    and only keys whose ``key_valid`` ``[N]`` entry is nonzero. Scores are ``q k^T * scale`` (default
    1/sqrt(D)); a query that sees no key outputs zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    out = torch.zeros_like(q)
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        qs = q[start:end].transpose(0, 1)  # [H, n, D]
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [H, n, n]
        visible = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if block_size is not None:
            blk = torch.arange(n, device=q.device) // block_size
            visible &= blk[:, None] >= blk[None, :]
        if key_valid is not None:
            visible &= key_valid[start:end].to(torch.bool)[None, :]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        probs = probs.masked_fill(~visible.any(dim=-1)[:, None], 0.0)  # all -inf rows: NaN -> 0
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


# ------------------------------------------------------------------------------------------------ row stats
def row_stats_reference(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                        step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor | None = None,
                        conf_exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the fused sampling kernels compute (``kernels/row_stats.py``, ``csrc/row_stats*``,
    ``kernels/lm_head_stats.py``): :func:`sample_and_score` of the rows ``logits[rows]`` (``rows`` ``[M]``
    int64/int32 indices; the per-row arguments are ``[M]``, ``conf_exclude`` ``[M, K]``), with the exact
    negative entropy (``entropy_eps=0``) and no top-k / top-p filter, and without raising: a row whose
    confidence logits hold NaN or +inf, or no finite entry, gets ``invalid`` = 1, token -1 and NaN scores.

    Returns ``token`` (int64), ``prob``, ``top1``, ``margin``, ``neg_entropy`` (work dtype: fp64 for fp64
    logits, else fp32) and ``invalid`` (int32), each ``[M]``."""
    x = logits[rows.to(torch.int64)]
    m = x.shape[0]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    q_logits = x.to(work)
    if conf_exclude is not None and conf_exclude.numel() == 0:
        conf_exclude = None
    if raw_confidence is not None and conf_exclude is not None:
        q_logits = q_logits.clone()
        cols = conf_exclude.to(torch.int64).reshape(m, -1)
        r, k = ((cols >= 0) & raw_confidence.bool()[:, None]).nonzero(as_tuple=True)
        q_logits[r, cols[r, k]] = float("-inf")
    if raw_confidence is None or not bool(raw_confidence.all()):
        hot = temperature > 0
        z = q_logits / torch.where(hot, temperature.to(work), torch.ones_like(temperature, dtype=work))[:, None]
        q_logits = z if raw_confidence is None else torch.where(raw_confidence.bool()[:, None], q_logits, z)
    mx = q_logits.max(dim=-1).values
    s = torch.exp(q_logits - mx[:, None]).sum(dim=-1)
    finite = torch.isfinite(q_logits) | (q_logits == float("-inf"))
    invalid = ~(finite.all(dim=-1) & torch.isfinite(mx) & torch.isfinite(s) & (s > 0))
    # Invalid rows are scored on zeros without exclusions (then overwritten), so that nothing raises.
    safe = torch.where(invalid[:, None], torch.zeros_like(x), x)
    if conf_exclude is not None:
        conf_exclude = torch.where(invalid.reshape(-1, *([1] * (conf_exclude.ndim - 1))),
                                   torch.full_like(conf_exclude, -1), conf_exclude)
    out = sample_and_score(safe, temperature, seed, step, position, raw_confidence=raw_confidence,
                           conf_exclude=conf_exclude, scores=("margin", "neg_entropy"), entropy_eps=0.0)
    out["token"] = torch.where(invalid, torch.full_like(out["token"], -1), out["token"])
    for key in ("prob", "top1", "margin", "neg_entropy"):
        out[key] = torch.where(invalid, torch.full_like(out[key], float("nan")), out[key])
    out["invalid"] = invalid.to(torch.int32)
    return out


# ---------------------------------------------------------------------------------------------- commit rules
COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY = 0, 1, 2, 3


def commit_reference(batch: CommitBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit (and optionally re-mask) in place on a flat ``canvas`` of token ids, for a batch of requests (the
    fields of ``batch``, a :class:`~diffuse_engine.commit_batch.CommitBatch`; any dtypes, nothing checked).

    Request b owns the candidate rows ``row_offsets[b]:row_offsets[b+1]`` (int64 ``[B+1]``): still-masked canvas
    slots ``row_index`` (flat indices into ``canvas``) with their sampled ``token``, ordering ``score`` (higher =
    more confident) and ``entropy`` (>= 0). Rows are ranked by score descending, ties by row order. The number k
    of rows committed (``canvas[row_index] = token`` for the k best) follows ``mode[b]``:

    - COMMIT_TOPK: k = min(count[b], rows) (LLaDA's schedule counts);
    - COMMIT_THRESHOLD: every row with score >= threshold[b], and always the best one (Fast-dLLM);
    - COMMIT_FACTOR: Fast-dLLM's factor rule: with sorted scores c_0 >= c_1 >= ... (n rows), i* = the first
      i >= 1 with c_i < 1 - factor / (i + 2), or n - 1 if none; k = i*, except k = n when i* = n - 1;
    - COMMIT_ENTROPY: EB-sampler: the largest k >= 1 with sum(H_0..H_{k-1}) - max(H_0..H_{k-1}) <= eb_gamma[b].

    Revision (optional): request b's committed slots ``revise_index[revise_offsets[b]:revise_offsets[b+1]]``
    whose ``revise_score`` is below ``remask_bound[b]`` are set back to ``mask_id`` (before this step's commits).

    Returns ``(committed [M] bool, counters [B, 3] int32)``: counters = (committed this step, re-masked this step,
    still masked among the candidate rows after the step; 0 means the request's block is done).
    """
    canvas, row_index, token, score, entropy = batch.canvas, batch.row_index, batch.token, batch.score, batch.entropy
    mode, count, threshold, factor, eb_gamma = batch.mode, batch.count, batch.threshold, batch.factor, batch.eb_gamma
    revise_offsets, revise_index, revise_score = batch.revise_offsets, batch.revise_index, batch.revise_score
    mask_id, remask_bound = batch.mask_id, batch.remask_bound
    offsets = batch.row_offsets.tolist()
    committed = torch.zeros(row_index.shape[0], dtype=torch.bool, device=canvas.device)
    counters = torch.zeros(len(offsets) - 1, 3, dtype=torch.int32, device=canvas.device)
    for b in range(len(offsets) - 1):
        remasked = 0
        if revise_offsets is not None:
            lo, hi = int(revise_offsets[b]), int(revise_offsets[b + 1])
            low = revise_score[lo:hi] < remask_bound[b]
            canvas[revise_index[lo:hi][low]] = mask_id
            remasked = int(low.sum())
        lo, hi = offsets[b], offsets[b + 1]
        n = hi - lo
        if n == 0:
            counters[b] = torch.tensor([0, remasked, remasked], dtype=torch.int32)
            continue
        order = sorted(range(n), key=lambda i: (-float(score[lo + i]), i))
        c = [float(score[lo + i]) for i in order]
        m = int(mode[b])
        if m == COMMIT_TOPK:
            k = min(int(count[b]), n)
        elif m == COMMIT_THRESHOLD:
            k = max(1, sum(1 for v in c if v >= float(threshold[b])))
        elif m == COMMIT_FACTOR:
            f = float(factor[b])
            first = next((i for i in range(1, n) if c[i] < 1 - f / (i + 2)), n - 1)
            k = n if first == n - 1 else first
        elif m == COMMIT_ENTROPY:
            h = [float(entropy[lo + i]) for i in order]
            k = 1
            while k < n and sum(h[:k + 1]) - max(h[:k + 1]) <= float(eb_gamma[b]):
                k += 1
        else:
            raise ValueError(f"unknown commit mode {m} for request {b}.")
        for i in order[:k]:
            canvas[row_index[lo + i]] = token[lo + i]
            committed[lo + i] = True
        counters[b] = torch.tensor([k, remasked, n - k + remasked], dtype=torch.int32)
    return committed, counters


# ---------------------------------------------------------------------------------------------- moe experts
def moe_experts_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                          topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The routed experts of a mixture-of-experts feed-forward, one token at a time (``ops.moe_experts``).

    x ``[N, d]``; w_gate, w_up ``[E, I, d]`` and w_down ``[E, d, I]`` (each expert's Linear weights, HF
    ``gate_proj`` / ``up_proj`` / ``down_proj``); topk_ids ``[N, k]`` expert ids, topk_weights ``[N, k]``.
    ``out[n] = sum_{j = 0..k-1} topk_weights[n, j] * down_e(silu(gate_e x[n]) * up_e x[n])``, e = topk_ids[n, j],
    every operation in ``dtype`` (fp64: the oracle; the input dtype: "plain torch" of the tolerance rule).
    Returns ``[N, d]`` in ``dtype``."""
    n, d = x.shape
    out = torch.zeros(n, d, dtype=dtype, device=x.device)
    ids = topk_ids.tolist()
    weights = topk_weights.to(dtype)
    experts: dict[int, tuple[torch.Tensor, ...]] = {}  # only the experts the tokens use, converted once
    for t in range(n):
        xt = x[t].to(dtype)
        acc = torch.zeros(d, dtype=dtype, device=x.device)
        for j, e in enumerate(ids[t]):
            if e not in experts:
                experts[e] = (w_gate[e].to(dtype), w_up[e].to(dtype), w_down[e].to(dtype))
            gate, up, down = experts[e]
            h = torch.nn.functional.silu(gate @ xt) * (up @ xt)
            acc = acc + weights[t, j] * (down @ h)
        out[t] = acc
    return out
