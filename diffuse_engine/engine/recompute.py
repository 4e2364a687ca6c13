"""What a step of a request recomputes: one rule per cache mode, read by the plan builder (:mod:`.plan`, the
positions a step feeds to the model) and by the scheduler's cost model (:func:`step_item`, the step's work).

- ``"none"``: the whole sequence, every step, reading no cache;
- ``"prefix"``: from the block start to the end of the sequence, reading the cached prefix;
- ``"dual"``: the block only, reading the cached prefix and suffix;
- a refresh step of a prefix / dual cache (a block's first step, and every ``cache_refresh`` steps): the whole
  sequence except what an earlier turn of the conversation left in the cache, writing what it recomputes;
- ``"block"`` (a block-diffusion model's exact cache): from what the cache holds to the end of the block, writing
  the finished blocks before the current one.
"""

from __future__ import annotations

from typing import NamedTuple

from .request import Request


class Recompute(NamedTuple):
    """Positions ``[lo, hi)`` of the sequence a step feeds to the model; ``read``: the cached ranges they see;
    ``write``: the range whose K/V the step stores (None: nothing)."""

    lo: int
    hi: int
    read: list[tuple[int, int]]
    write: tuple[int, int] | None


def recompute(req: Request, shift: int = 0, steady: bool = False) -> Recompute:
    """What a step of ``req`` recomputes now. ``shift``: 1 for shifted-logit models (a block's first position is
    predicted from the one before it). ``steady``: the block's steady state, as the cost model counts it (no
    refresh step; an exact block cache holding everything before the block)."""
    start, end = req.block_span
    length = req.seq_len
    mode = req.cache_mode
    if mode == "none":
        return Recompute(0, length, [], None)
    if mode == "block":  # finished blocks are cached once; the first step also runs what is not cached yet
        lo = start if steady else req.cached_upto
        return Recompute(lo, end, [(0, lo)], (lo, start - start % req.block_size))
    if req.refresh_step and not steady:  # everything but what an earlier turn of the conversation left in the cache
        lo = req.reused
        return Recompute(lo, length, [(0, lo)], (lo, length))
    lo = start - shift
    if mode == "prefix":
        return Recompute(lo, length, [(0, lo)], None)
    return Recompute(lo, end, [(0, lo), (end, length)], None)


def step_item(req: Request) -> tuple[int, int, int]:
    """The steady-state work of one step of ``req``: (tokens recomputed, cached keys read, LM-head rows)."""
    r = recompute(req, steady=True)
    q = r.hi - r.lo
    ctx = sum(b - a for a, b in r.read)
    return q, ctx, max(1, min(q, req.block_masked_count))
