"""The plan of a step: every tensor a step reads that changes only when the batch or a request's phase changes.

A request's phase is what decides its step's shapes: its block, whether this step refreshes its cache, what its
exact block cache holds, its window (the positions it may commit), whether a revision policy verifies. While no
running request changes phase, consecutive steps reuse one plan: the host uploads nothing but an eager step's
candidate rows (:meth:`.runner.ModelRunner.candidate_rows`). A plan is built from host values only (Python ints
and numpy arrays, never a read of a device tensor; the per-request settings: :mod:`.settings`); its step
tensors reach the device in one non-blocking copy from pinned memory (:class:`~.canvas.Upload`), its attention
plan's (page slots, masks, kernel arguments) in a few more.

Rows. Request b of the batch owns the window ``[window_lo, block_end)`` of its sequence; its positions are the
columns ``0..width_b-1`` of the padded ``[B, W]`` matrices of the step's decisions (``W`` = the widest window;
cells past a request's width are padding: flat canvas index :attr:`CanvasStore.trash`, ``valid`` False). The LM
head sees only real cells, flattened request after request (``M`` rows), and ``row_pad`` places them in the
matrix. Row ``i`` reads hidden state ``row_hidden[i]`` of the packed forward (with Dream's shifted logits, the
state one position to the left).

Per-request settings that move every step (``nfe``, ``block_step``) are device counters the step advances itself,
so that a reused plan needs no upload at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import TokenLayout
from ..policies import revision_policy, score_statistics
from .attention_plan import AttentionPlan, SeqPlan
from .canvas import CanvasStore, Upload, upload
from .kv_cache import PagedKVCache
from .recompute import recompute
from .request import Request
from .settings import counters, orderings, revision_settings, rules, sampling

# The axis each plan tensor runs along (what padding a batch to a CUDA-graph bucket extends): fresh tokens, head
# rows, the [B, W] decision matrices; every other tensor is per request ([B] or [B, T]).
FRESH_AXIS = ("gather", "force_mask", "positions")
ROW_AXIS = ("row_hidden", "row_req", "row_pad", "row_pos", "row_temp", "row_seed", "row_raw", "row_exclude",
            "row_top_k", "row_top_p", "row_eos_inf")
PAD_AXIS = ("pad_flat", "pad_valid", "pad_pos", "pad_in_block")
# Counter columns of the step's copy back to the host (see step.pack_outputs).
COUNTERS = ("block_masked", "first_masked", "eos_in_block", "invalid", "revised")


def phase(req: Request) -> tuple:
    """What a step of ``req`` looks like: equal phases give equal plans."""
    rev = revision_policy(req)
    return (id(req), req.block, req.refresh_step and req.cache_mode in ("prefix", "dual"), req.cached_upto,
            req.window_lo, rev.name if rev is not None else None)


@dataclass(slots=True)
class StepPlan:
    """One step's plan (see the module docstring). Host fields describe shapes and which code paths run; ``t``
    holds the device tensors (names documented in :func:`build_plan`)."""

    key: tuple
    requests: list[Request]
    batch: int
    width: int
    num_rows: int
    layout: TokenLayout
    t: dict[str, torch.Tensor]
    generation: int
    trash: int
    # host decisions about which paths run
    fused: bool = False
    head_eligible: bool = False  # no request needs the logits themselves (guidance, top-k / top-p, eos at -inf)
    any_hot: bool = False
    any_raw: bool = False
    all_raw: bool = False
    any_exclude: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_eos_inf: bool = False
    any_cfg: bool = False
    any_verify: bool = False
    any_random: bool = False
    any_origin: bool = False
    any_alg: bool = False
    revisions: tuple[str, ...] = ()  # revision policies acting this step; request b's is revisions[rev_kind[b] - 1]
    any_remdm_conf: bool = False
    any_snapshot: bool = False
    any_force: bool = False
    scores: tuple[str, ...] = ()
    # host arrays for the mirror update: flat (slot, position) of each real cell, and the cells' mask in [B, W]
    host_slot: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    host_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    host_valid: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    score_dtype: torch.dtype = torch.float32


def _sequence(req: Request, shift: int, block_size: int | None, uncond: bool, verify: bool,
              pages) -> tuple[SeqPlan, int]:
    """What one sequence of ``req`` recomputes, reads and writes this step (and its first fresh position)."""
    lo, hi, read, write = recompute(req, shift)
    positions = np.arange(lo, hi, dtype=np.int64)
    hidden = None
    if verify and not uncond:
        start, end = req.block_span
        block = np.arange(start, end, dtype=np.int64)
        positions = np.concatenate((positions, block - shift))
        hidden = block
    return SeqPlan(lo, hi - lo, positions, read, write, pages, block_size, hidden), lo


def build_plan(requests: list[Request], key: tuple, store: CanvasStore, cache: PagedKVCache | None, *, mask_id: int,
               shifted: bool, block_size: int | None, eot_id: int | None, eos_id: int, fused: bool,
               score_dtype: torch.dtype) -> StepPlan:
    """The plan of a step of ``requests`` (running, each with a slot). Device tensors (``t``):

    forward: ``gather`` [N] flat canvas index of each fresh token, ``force_mask`` [N] (fresh tokens that are
    [MASK] whatever the canvas holds: an unconditional copy's prompt, LLaDA's verification queries), ``positions``
    [N]; rows (M): ``row_hidden``, ``row_req``, ``row_pad``, ``row_pos``, ``row_temp``, ``row_seed``, ``row_raw``,
    ``row_exclude`` [M, 2], ``row_top_k``, ``row_top_p``, ``row_eos_inf``; guidance: ``cfg_hidden`` / ``cfg_row``
    / ``cfg_scale`` [Mu]; verification: ``verify_hidden`` / ``verify_pad`` [Mv]; the [B, W] matrices ``pad_flat``,
    ``pad_valid``, ``pad_in_block``, ``pad_pos``; per request [B]: ``seed``, counters ``nfe``, ``block_step``
    (advanced by the step), ``block_col`` (the block's first column), ``block_len``, commit rule ``mode``,
    ``threshold``, ``factor``, ``gamma``, count ``count_kind`` / ``spb`` / ``counts`` [B, T] / ``timesteps``
    [B, T + 1], orderings ``ord_<source>`` (policies/ordering.py: margin, neg_entropy, uniform, coins, ...),
    ``ord_alg`` / ``alg_temp``, revision ``rev_kind`` (0: none), ``remdm_variant``, ``remdm_eta``, ``adaptive``,
    ``verify_threshold``, ``edit_margin``."""
    shift = 1 if shifted else 0
    windows = [r.window() for r in requests]
    width = max(max(end - lo for lo, end in windows), 1)
    verify = [(rev := revision_policy(r)) is not None and rev.verifies for r in requests]
    cfg = [r.params.cfg_scale > 0 for r in requests]
    planned = any(r.cache_mode != "none" for r in requests) or any(verify)
    up = Upload()
    seqs, offsets, uncond_at, force_all = _forward(up, requests, store, shift, block_size, verify, cfg)
    m, row_req_all, pad_valid, pad_pos, any_cfg, any_verify = _rows(up, requests, store, seqs, offsets, uncond_at,
                                                                    windows, width, shift, verify)
    smp = sampling(up, requests, row_req_all, eot_id, eos_id)
    counters(up, requests, windows)
    rules(up, requests)
    ordering, ord_random, ord_origin, ord_alg = orderings(up, requests, score_dtype)
    revisions, any_remdm_conf = revision_settings(up, requests, score_dtype)

    t = up.finish(store.device)
    layout = TokenLayout.packed([s.num_tokens for s in seqs], block_size=block_size)
    if planned:
        layout.kv = AttentionPlan(cache, seqs, store.device)
    else:
        layout.cu_seqlens_device = upload(np.asarray(layout.cu_seqlens, dtype=np.int32), store.device)
    scores = score_statistics(ordering, [r.params.policy for r in requests])
    eligible = not any_cfg and not smp.top_k.any() and not (smp.top_p < 1).any() and not smp.eos_inf.any()
    host_rows, host_cols = np.nonzero(pad_valid)
    return StepPlan(
        key=key, requests=list(requests), batch=len(requests), width=width, num_rows=m, layout=layout, t=t,
        generation=store.generation, trash=store.trash,
        fused=fused and eligible, head_eligible=eligible,
        any_hot=bool((smp.temps > 0).any()), any_raw=bool(smp.raw.any()), all_raw=bool(smp.raw.all()),
        any_exclude=smp.any_exclude, any_top_k=bool(smp.top_k.any()), any_top_p=bool((smp.top_p < 1).any()),
        any_eos_inf=bool(smp.eos_inf.any()), any_cfg=any_cfg, any_verify=any_verify, any_random=any(ord_random),
        any_origin=any(ord_origin), any_alg=any(ord_alg), revisions=revisions, any_remdm_conf=any_remdm_conf,
        any_snapshot=any(r.snapshots for r in requests), any_force=bool(force_all.any()),
        scores=tuple(sorted(scores)),
        host_slot=np.asarray([r.slot for r in requests], dtype=np.int64)[host_rows],
        host_pos=pad_pos[host_rows, host_cols], host_valid=pad_valid, score_dtype=score_dtype)


def _forward(up: Upload, requests: list[Request], store: CanvasStore, shift: int, block_size: int | None,
             verify: list[bool], cfg: list[bool]) -> tuple[list[SeqPlan], list[int], dict, np.ndarray]:
    """The packed forward: cond sequences in batch order, then the unconditional copies (``gather``,
    ``force_mask``, ``positions``). Returns the sequences, each cond sequence's first position, where each
    unconditional copy is (sequence index, first position), and the force mask."""
    cap = store.capacity
    seqs, gather, force, offsets = [], [], [], []
    for i, r in enumerate(requests):
        seq, lo = _sequence(r, shift, block_size, False, verify[i], r.pages)
        seqs.append(seq)
        offsets.append(lo)
        base = r.slot * cap
        g = base + seq.positions
        f = np.zeros(seq.num_tokens, dtype=bool)
        if seq.hidden is not None and not shift:
            f[seq.num_main:] = True  # LLaDA's query is [MASK] at the verified position itself
        gather.append(g)
        force.append(f)
    uncond_at = {}
    for i, r in enumerate(requests):
        if cfg[i]:
            seq, lo = _sequence(r, shift, block_size, True, False, r.uncond_pages)
            uncond_at[i] = (len(seqs), lo)
            seqs.append(seq)
            gather.append(r.slot * cap + seq.positions)
            force.append((seq.positions < r.prompt_len) | (seq.positions >= r.canvas_end))  # prompt, suffix
    up.add("gather", np.concatenate(gather), torch.int64)
    force_all = np.concatenate(force)
    up.add("force_mask", force_all, torch.bool)
    up.add("positions", np.concatenate([s.positions for s in seqs]), torch.int64)
    return seqs, offsets, uncond_at, force_all


def _rows(up: Upload, requests: list[Request], store: CanvasStore, seqs: list[SeqPlan], offsets: list[int],
          uncond_at: dict, windows: list[tuple[int, int]], width: int, shift: int,
          verify: list[bool]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, bool, bool]:
    """The head's rows and the padded [B, W] matrices. Returns the number of rows, each row's request, the
    matrices' valid cells and positions, and whether any row has guidance / a verification query."""
    nb, cap = len(requests), store.capacity
    seq_start = np.cumsum([0] + [s.num_tokens for s in seqs])
    cols = np.arange(width, dtype=np.int64)
    pad_valid = np.zeros((nb, width), dtype=bool)
    pad_flat = np.full((nb, width), store.trash, dtype=np.int64)
    pad_pos = np.zeros((nb, width), dtype=np.int64)
    pad_in_block = np.zeros((nb, width), dtype=bool)
    row_hidden, row_req, row_pad, row_pos = [], [], [], []
    cfg_hidden, cfg_row, cfg_scale = [], [], []
    verify_hidden, verify_pad = [], []
    m = 0
    for i, r in enumerate(requests):
        lo_w, end = windows[i]
        w = end - lo_w
        start = r.block_span[0]
        pos = lo_w + cols[:w]
        pad_valid[i, :w] = True
        pad_flat[i, :w] = r.slot * cap + pos
        pad_pos[i, :w] = pos
        pad_in_block[i, :w] = pos >= start
        seq = seqs[i]
        row_hidden.append(seq_start[i] + pos - shift - offsets[i])
        row_req.append(np.full(w, i, dtype=np.int64))
        row_pad.append(i * width + cols[:w])
        row_pos.append(pos)
        if i in uncond_at:
            j, ulo = uncond_at[i]
            cfg_hidden.append(seq_start[j] + pos - shift - ulo)
            cfg_row.append(m + cols[:w])
            cfg_scale.append(np.full(w, r.params.cfg_scale))
        if verify[i]:
            nblk = r.block_span[1] - start
            verify_hidden.append(seq_start[i] + seq.num_main + np.arange(nblk, dtype=np.int64))
            verify_pad.append(i * width + (start - lo_w) + np.arange(nblk, dtype=np.int64))
        m += w
    row_req_all = np.concatenate(row_req)
    up.add("row_hidden", np.concatenate(row_hidden), torch.int64)
    up.add("row_req", row_req_all, torch.int64)
    up.add("row_pad", np.concatenate(row_pad), torch.int64)
    up.add("row_pos", np.concatenate(row_pos), torch.int64)
    for name, a, dtype in (("pad_flat", pad_flat, torch.int64), ("pad_valid", pad_valid, torch.bool),
                           ("pad_pos", pad_pos, torch.int64), ("pad_in_block", pad_in_block, torch.bool)):
        up.add(name, a, dtype)
    for name, parts, dtype in (("cfg_hidden", cfg_hidden, torch.int64), ("cfg_row", cfg_row, torch.int64),
                               ("cfg_scale", cfg_scale, torch.float64), ("verify_hidden", verify_hidden, torch.int64),
                               ("verify_pad", verify_pad, torch.int64)):
        if parts:
            up.add(name, np.concatenate(parts), dtype)
    return m, row_req_all, pad_valid, pad_pos, bool(cfg_row), bool(verify_pad)
