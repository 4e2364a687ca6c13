"""The commit op vectorised over the batch in plain torch (CPU or CUDA): the engine's torch path for
``ops.commit``. Semantics and results are those of :func:`kernels.reference.commit_reference`, whose Python loops
stay the oracle.

How it works, with B requests and R = ``max_rows`` (a bound on any request's candidate rows):

1. Revision: each revise slot finds its request by a ``searchsorted`` over ``revise_offsets``; the slots scored
   below their request's bound are set back to the mask id (before the commits, as the reference does).
2. Ranking: the scores go into a ``[B, R]`` matrix padded with -inf after each request's rows, and one stable
   descending sort per row ranks them (ties by row order, padding last).
3. k per request, for every rule at once, from the sorted scores (and the entropies gathered in score order),
   in fp64 like the reference's Python floats; then each request's mode picks its k.
4. A row is committed when its rank is below its request's k; tokens go to the canvas in one indexed write.

The Python work per call is a fixed number of tensor ops whatever B, R or M; the only host sync is reading R from
``row_offsets`` when ``max_rows`` is None (on CPU tensors, also the check of the modes; see below).
"""

from __future__ import annotations

import torch

from ..commit_batch import CommitBatch
from .reference import COMMIT_ENTROPY, COMMIT_FACTOR, COMMIT_THRESHOLD, COMMIT_TOPK

_MODES = (COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY)


def _segments(offsets: torch.Tensor, size: int, num_requests: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """For the entries ``0..size-1`` of a flat array split by ``offsets`` ``[B+1]`` (int64): each entry's request
    (clamped into ``[0, B)``), its position within that request's span, and whether it lies in any span."""
    j = torch.arange(size, device=offsets.device, dtype=torch.int64)
    req = torch.searchsorted(offsets[1:].contiguous(), j, right=True).clamp_(max=num_requests - 1)
    pos = j - offsets[req]
    inside = (j >= offsets[0]) & (j < offsets[num_requests])
    return req, pos, inside


def _first(flags: torch.Tensor, cols: torch.Tensor, none: torch.Tensor) -> torch.Tensor:
    """Per row of the bool matrix ``flags`` ``[B, R]``: the first column that is set, else ``none`` ``[B]``."""
    width = flags.shape[1]
    first = torch.where(flags, cols, width).amin(dim=1)
    return torch.where(first == width, none, first)


def _check_modes(mode: torch.Tensor, sizes: torch.Tensor) -> None:
    """Raise as the reference does for the first request with rows and an unknown mode (CPU tensors only)."""
    known = torch.zeros_like(sizes, dtype=torch.bool)
    for m in _MODES:
        known |= mode == m
    bad = (sizes > 0) & ~known
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"unknown commit mode {int(mode[b])} for request {b}.")


def commit_torch(batch: CommitBatch, *, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit (and optionally re-mask) in place on the flat ``batch.canvas``, as
    :func:`kernels.reference.commit_reference`: same batch, same rules, same
    ``(committed [M] bool, counters [B, 3] int32)``, on the canvas' device. The batch is checked by
    :meth:`CommitBatch.validate` without ``strict``: lengths and devices, any dtypes and strides.

    ``max_rows``: a bound on any request's candidate row count (the block size); it sets the width of the ranking
    matrix. When None it is read from ``row_offsets`` (one device-to-host sync). A request with more rows than
    ``max_rows`` is a contract error: its rows past the bound are never committed.

    Where the reference has no single answer or would need a sync, the contract is as for the kernels
    (unchecked): offsets non-decreasing, slots distinct within and across the candidate and revise slots of the
    batch (the writes are one indexed write each), scores not NaN. Differences that remain:

    - an unknown mode for a request with rows raises ValueError on CPU tensors as the reference, but before
      anything is written (the reference has processed the requests before it); on CUDA tensors it is not
      checked (a sync) and such a request commits nothing: counters ``(0, remasked, rows + remasked)``;
    - the entropy rule's prefix sums come from ``cumsum`` in fp64: sequential, so bit-equal to the reference's
      Python ``sum``, on the CPU; a parallel scan on CUDA may round a sum differently (ulp level, so only a
      budget ``eb_gamma`` met within an ulp can see another k).

    A negative ``count`` is taken as the reference takes it: ``k = count`` in the counters and the best
    ``rows + count`` rows committed (Python's ``order[:k]``).
    """
    batch.validate(strict=False)
    canvas, row_index, token, score, entropy = batch.canvas, batch.row_index, batch.token, batch.score, batch.entropy
    mode, count, threshold, factor, eb_gamma = batch.mode, batch.count, batch.threshold, batch.factor, batch.eb_gamma
    revise_offsets, revise_index = batch.revise_offsets, batch.revise_index
    revise_score, remask_bound, mask_id = batch.revise_score, batch.remask_bound, batch.mask_id
    has_revise = batch.has_revision
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
        raise ValueError(f"max_rows must be a non-negative int (rows per request) or None; got {max_rows!r}.")
    device = canvas.device
    nb, m = batch.num_requests, batch.num_rows
    committed = torch.zeros(m, dtype=torch.bool, device=device)
    if nb <= 0:
        return committed, torch.zeros(0, 3, dtype=torch.int32, device=device)
    offsets = batch.row_offsets.to(torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    md = mode.to(torch.int64)
    if device.type == "cpu":
        _check_modes(md, sizes)
    if max_rows is None:
        max_rows = max(int(sizes.max()), 0)  # the one sync
    width = max(max_rows, 1)  # one column at least: reductions over an empty dim are refused

    # 1. Revision: re-mask the committed slots scored below their request's bound.
    remasked = torch.zeros(nb, dtype=torch.int64, device=device)
    if has_revise:
        roff = revise_offsets.to(torch.int64)
        rreq, _, rin = _segments(roff, revise_index.shape[0], nb)
        # The reference compares a 1-D score slice with a 0-D bound: the bound takes the scores' dtype
        # (same category), which can round it; keep that promotion.
        dtype = torch.result_type(revise_score, torch.zeros((), dtype=remask_bound.dtype))
        low = rin & (revise_score.to(dtype) < remask_bound.to(dtype)[rreq])
        ridx = revise_index.to(torch.int64)
        current = canvas[ridx]
        canvas[ridx] = torch.where(low, torch.full_like(current, mask_id), current)
        remasked.index_add_(0, rreq, low.to(torch.int64))

    # 2. Ranking: one stable descending sort of the padded [B, width] score matrix; a flat slot per row, with
    # rows outside every span (or past the width) sent to one trash slot at the end.
    req, pos, inside = _segments(offsets, m, nb)
    inside &= pos < width
    trash = nb * width
    slot = torch.where(inside, req * width + pos, trash)
    key = score if score.is_floating_point() else score.to(torch.float64)
    key = key + 0  # -0.0 -> +0.0: equal scores for the reference, distinct bit patterns for a radix sort
    padded = torch.full((trash + 1,), float("-inf"), dtype=key.dtype, device=device)
    padded.index_put_((slot,), key)
    ranked, perm = torch.sort(padded[:trash].view(nb, width), dim=1, descending=True, stable=True)
    cols = torch.arange(width, device=device, dtype=torch.int64)
    in_row = cols < sizes[:, None]
    c = ranked.to(torch.float64)

    # 3. k per request for every rule; ``take`` is how many of the best rows are committed.
    k_topk = torch.minimum(count.to(torch.int64), sizes)
    take_topk = torch.where(k_topk >= 0, k_topk, (sizes + k_topk).clamp(min=0))
    k_thr = ((c >= threshold.to(torch.float64)[:, None]) & in_row).sum(dim=1).clamp(min=1)
    bound = 1 - factor.to(torch.float64)[:, None] / (cols + 2).to(torch.float64)
    first = _first((c < bound) & in_row & (cols >= 1), cols, sizes - 1)
    k_fac = torch.where(first == sizes - 1, sizes, first)  # the Fast-dLLM quirk: i* = n - 1 commits all n
    h = torch.zeros(trash + 1, dtype=torch.float64, device=device)
    h.index_put_((slot,), entropy.to(torch.float64))
    h = h[:trash].view(nb, width).gather(1, perm)
    spread = h.cumsum(dim=1) - h.cummax(dim=1).values
    fails = ~(spread <= eb_gamma.to(torch.float64)[:, None]) & in_row & (cols >= 1)
    k_ent = _first(fails, cols, sizes)  # the while loop stops at the first prefix over the budget

    k = torch.where(md == COMMIT_TOPK, k_topk, torch.where(md == COMMIT_THRESHOLD, k_thr, torch.where(
        md == COMMIT_FACTOR, k_fac, torch.where(md == COMMIT_ENTROPY, k_ent, 0))))
    empty = sizes <= 0
    k = torch.where(empty, 0, k)
    take = torch.where(empty, 0, torch.where(md == COMMIT_TOPK, take_topk, k))

    # 4. Commit the rows ranked below their request's take.
    rank = torch.empty_like(perm).scatter_(1, perm, cols.expand(nb, width))
    row_rank = torch.cat((rank.view(-1), rank.new_full((1,), width)))[slot]
    committed = inside & (row_rank < take[req])
    idx = row_index.to(torch.int64)
    canvas[idx] = torch.where(committed, token.to(canvas.dtype), canvas[idx])
    counters = torch.stack((k, remasked, sizes - k + remasked), dim=1).to(torch.int32)
    return committed, counters
