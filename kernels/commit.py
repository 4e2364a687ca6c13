"""Commit the best candidate rows of each request into the canvas (top-k, threshold, factor or entropy-budget rule),
after an optional re-mask of low-scored committed slots; its reference is ``kernels.reference.commit_reference``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..commit_batch import CommitBatch

# reference.COMMIT_*: the per-request rule that sets k
COMMIT_TOPK = tl.constexpr(0)
COMMIT_THRESHOLD = tl.constexpr(1)
COMMIT_FACTOR = tl.constexpr(2)
COMMIT_ENTROPY = tl.constexpr(3)
_BLOCK_REVISE = 64  # revise slots per loop trip: a request re-masks a few dozen slots at most
# The rank is an O(n^2) comparison in registers: a [MAX_ROWS, MAX_ROWS] tile per request. Blocks of 32-256 rows
# (the engine's block sizes) fit; past 1024 rows one program would hold a million-entry tile.
_MAX_TILE = 1024


@triton.jit
def _commit_kernel(
    canvas_ptr, row_off_ptr, row_idx_ptr, token_ptr, score_ptr, entropy_ptr,  # [C], [B+1], [M] x 4
    mode_ptr, count_ptr, thr_ptr, factor_ptr, gamma_ptr,  # [B] each
    rev_off_ptr, rev_idx_ptr, rev_score_ptr, bound_ptr,  # [B+1], [R], [R], [B] (unused without HAS_REVISE)
    committed_ptr, counters_ptr,  # outputs: [M] uint8 (bool storage), [B, 3] int32
    mask_id,
    HAS_REVISE: tl.constexpr, MAX_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per request: its n <= MAX_ROWS candidate rows in one tile. Each row's rank in the descending
    score order (ties by row order) is the number of rows that beat it, so the k best are the rows of rank < k
    without a sort; every rule reads its ranked quantities through that rank. Rule arithmetic is in fp64, as the
    reference's Python floats, so that k is exact."""
    b = tl.program_id(0)
    lo = tl.load(row_off_ptr + b)
    n = (tl.load(row_off_ptr + b + 1) - lo).to(tl.int32)
    offs = tl.arange(0, MAX_ROWS)
    ok = offs < n
    s = tl.load(score_ptr + lo + offs, mask=ok, other=0.0)

    beats = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (offs[None, :] < offs[:, None]))
    rank = tl.sum((beats & ok[None, :]).to(tl.int32), axis=1)
    rank = tl.where(ok, rank, MAX_ROWS)  # padding ranks after every row

    mode = tl.load(mode_ptr + b)
    s64 = s.to(tl.float64)
    # Top-k: the schedule's count (a negative count commits nothing).
    k_topk = tl.maximum(tl.load(count_ptr + b), 0)
    # Threshold: the rows at or above t are a prefix of the ranked order; the best row always commits.
    thr = tl.load(thr_ptr + b)
    k_thr = tl.maximum(tl.sum((ok & (s >= thr)).to(tl.int32), axis=0), 1)
    # Factor: the smallest rank i >= 1 with c_i < 1 - f / (i + 2), else n - 1; k = n in that last case.
    f = tl.load(factor_ptr + b).to(tl.float64)
    fail = ok & (rank >= 1) & (s64 < 1.0 - f / (rank + 2).to(tl.float64))
    first = tl.min(tl.where(fail, rank, n - 1), axis=0)
    k_factor = tl.where(first == n - 1, n, first)
    # Entropy budget: the prefix ending at rank r is the rows of rank <= r; k = the first rank r >= 1 whose prefix
    # exceeds the budget (sum - max > gamma), else n. Sums of fp32 entropies in fp64 are exact for up to ~2^29
    # rows of a similar magnitude, so the order of the tree sum does not matter.
    h = tl.load(entropy_ptr + lo + offs, mask=ok, other=0.0).to(tl.float64)
    gamma = tl.load(gamma_ptr + b).to(tl.float64)
    prefix = ok[None, :] & (rank[None, :] <= rank[:, None])
    h_prefix_max = tl.max(tl.where(prefix, h[None, :], float("-inf")), axis=1)
    spent = tl.sum(tl.where(prefix, h[None, :], 0.0), axis=1) - h_prefix_max
    over = ok & (rank >= 1) & ((spent <= gamma).to(tl.int32) == 0)  # not (<=), as the reference's loop test
    k_entropy = tl.min(tl.where(over, rank, n), axis=0)

    k = tl.where(mode == COMMIT_TOPK, k_topk,
                 tl.where(mode == COMMIT_THRESHOLD, k_thr,
                          tl.where(mode == COMMIT_FACTOR, k_factor,
                                   tl.where(mode == COMMIT_ENTROPY, k_entropy, 0))))
    k = tl.minimum(k, n)

    remasked = 0
    if HAS_REVISE:
        rlo = tl.load(rev_off_ptr + b)
        nr = (tl.load(rev_off_ptr + b + 1) - rlo).to(tl.int32)
        bound = tl.load(bound_ptr + b)
        low_count = tl.zeros([BLOCK_R], tl.int32)
        for start in range(0, nr, BLOCK_R):
            r_offs = start + tl.arange(0, BLOCK_R)
            r_ok = r_offs < nr
            rs = tl.load(rev_score_ptr + rlo + r_offs, mask=r_ok, other=0.0)
            low = r_ok & (rs < bound)
            slot = tl.load(rev_idx_ptr + rlo + r_offs, mask=r_ok, other=0)
            tl.store(canvas_ptr + slot, tl.zeros([BLOCK_R], tl.int64) + mask_id, mask=low)
            low_count += low.to(tl.int32)
        remasked = tl.sum(low_count, axis=0)
        tl.debug_barrier()  # re-masks land before this step's commits, as in the reference

    take = ok & (rank < k)
    slot = tl.load(row_idx_ptr + lo + offs, mask=ok, other=0)
    tok = tl.load(token_ptr + lo + offs, mask=take, other=0)
    tl.store(canvas_ptr + slot, tok, mask=take)
    tl.store(committed_ptr + lo + offs, take.to(tl.uint8), mask=ok)
    tl.store(counters_ptr + b * 3 + 0, k)
    tl.store(counters_ptr + b * 3 + 1, remasked)
    tl.store(counters_ptr + b * 3 + 2, n - k + remasked)


def commit(batch: CommitBatch, *, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit in place on the flat int64 ``batch.canvas``, request by request, as ``commit_reference`` (same batch,
    same ``(committed [M] bool, counters [B, 3] int32)``), with one program per request and no host sync.

    The batch must keep :meth:`CommitBatch.validate`'s strict contract: ``row_offsets`` int64 ``[B+1]``;
    ``row_index``, ``token`` int64 and ``score``, ``entropy`` fp32, each ``[M]``; ``mode``, ``count`` int32 and
    ``threshold``, ``factor``, ``eb_gamma`` fp32, each ``[B]``; revision (all four or none): ``revise_offsets`` int64
    ``[B+1]``, ``revise_index`` int64 and ``revise_score`` fp32 ``[R]``, ``remask_bound`` fp32 ``[B]``; all contiguous
    on the canvas' device; ``mask_id`` >= 0. ``max_rows``: a bound on any request's row count (the block size); it
    sizes the tile. When None it is read from ``row_offsets``, one device-to-host sync; the engine passes it. A
    request with more rows than ``max_rows`` is a contract error (only its first rows are ranked).

    Not checked (each would synchronise): offsets nondecreasing within ``[0, M]`` / ``[0, R]``, slot indices in
    range, candidate and revise slots distinct across the batch, scores not NaN, entropies >= 0, modes in 0..3
    (another mode commits nothing; the reference raises), count >= 0 (a negative count commits nothing).

    Traffic: ~40 B per candidate row (index, token, score, entropy, one canvas write, the committed flag), ~20 B per
    revise slot and ~40 B per request; the ranking is O(n^2) compares in registers per request."""
    b = batch.validate()
    if b.mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative int; got {b.mask_id!r}.")
    device, nb, m = b.canvas.device, b.num_requests, b.num_rows
    if max_rows is None:
        max_rows = int((b.row_offsets[1:] - b.row_offsets[:-1]).max()) if nb > 0 else 0  # the one sync
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or not 0 <= max_rows <= _MAX_TILE:
        raise ValueError(f"max_rows must be an int in [0, {_MAX_TILE}] (rows per request); got {max_rows!r}.")

    committed = torch.zeros(m, dtype=torch.bool, device=device)
    counters = torch.zeros(nb, 3, dtype=torch.int32, device=device)
    if nb == 0:
        return committed, counters
    tile = max(16, triton.next_power_of_2(max_rows))
    rev = (b.revise_offsets, b.revise_index, b.revise_score, b.remask_bound) if b.has_revision else \
        (b.row_offsets, b.row_index, b.score, b.threshold)  # unused pointers without revision
    _commit_kernel[(nb,)](
        b.canvas, b.row_offsets, b.row_index, b.token, b.score, b.entropy,
        b.mode, b.count, b.threshold, b.factor, b.eb_gamma,
        *rev,
        committed.view(torch.uint8), counters,
        b.mask_id,
        HAS_REVISE=b.has_revision, MAX_ROWS=tile, BLOCK_R=_BLOCK_REVISE,
        num_warps=4 if tile <= 64 else 8,
    )
    return committed, counters
