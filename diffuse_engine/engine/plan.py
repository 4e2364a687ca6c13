"""The plan of a step: every tensor a step reads that changes only when the batch or a request's phase changes.

A request's phase is what decides its step's shapes: its block, whether this step refreshes its cache, what its
exact block cache holds, its window (the positions it may commit), whether a revision policy verifies. While no
running request changes phase, consecutive steps reuse one plan: the host uploads nothing but an eager step's
candidate rows (:meth:`Engine._candidate_rows`). A plan is built from host values only (Python ints and numpy
arrays, never a read of a device tensor); its step tensors reach the device in one non-blocking copy from pinned
memory (:class:`Upload`), its attention plan's (page slots, masks, kernel arguments) in a few more.

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
from ..policies import ORDERINGS, decoding_policy, ordering_flags, revision_policy, score_statistics
from .attention_plan import AttentionPlan, SeqPlan
from .canvas import CanvasStore, upload
from .kv_cache import PagedKVCache
from .request import Request

# The axis each plan tensor runs along (what padding a batch to a CUDA-graph bucket extends): fresh tokens, head
# rows, the [B, W] decision matrices; every other tensor is per request ([B] or [B, T]).
FRESH_AXIS = ("gather", "force_mask", "positions")
ROW_AXIS = ("row_hidden", "row_req", "row_pad", "row_pos", "row_temp", "row_seed", "row_raw", "row_exclude",
            "row_top_k", "row_top_p", "row_eos_inf")
PAD_AXIS = ("pad_flat", "pad_valid", "pad_pos", "pad_in_block")
# Counter columns of the step's copy back to the host (see step.pack_outputs).
COUNTERS = ("block_masked", "first_masked", "eos_in_block", "invalid", "revised")
REMDM_VARIANTS = {"cap": 0, "rescale": 1, "conf": 2}


def phase(req: Request) -> tuple:
    """What a step of ``req`` looks like: equal phases give equal plans."""
    rev = revision_policy(req)
    return (id(req), req.block, req.refresh_step and req.cache_mode in ("prefix", "dual"), req.cached_upto,
            req.window_lo, rev.name if rev is not None else None)


class Upload:
    """Host arrays packed into one int64 buffer, copied to the device once, then viewed with their own dtypes
    (bool and integers as int64 words, floats as float64 bit patterns)."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, np.ndarray, torch.dtype, tuple[int, ...]]] = []

    def add(self, name: str, array, dtype: torch.dtype) -> None:
        a = np.asarray(array)
        self._parts.append((name, a, dtype, a.shape))

    def finish(self, device: torch.device) -> dict[str, torch.Tensor]:
        words = []
        for _, a, dtype, _ in self._parts:
            if dtype.is_floating_point:
                words.append(np.ascontiguousarray(a, dtype=np.float64).reshape(-1).view(np.int64))
            else:
                words.append(np.ascontiguousarray(a, dtype=np.int64).reshape(-1))
        flat = upload(np.concatenate(words) if words else np.zeros(0, dtype=np.int64), device)
        out, at = {}, 0
        for (name, _, dtype, shape), w in zip(self._parts, words, strict=True):
            seg = flat[at:at + w.shape[0]]
            at += w.shape[0]
            if dtype.is_floating_point:
                seg = seg.view(torch.float64)
            out[name] = (seg if seg.dtype == dtype else seg.to(dtype)).view(shape)
        return out


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
    start, end = req.block_span
    length = req.seq_len
    mode, read, write = req.cache_mode, [], None
    if mode == "block":  # finished blocks are cached once; the first step also runs what is not cached yet
        lo, hi = req.cached_upto, end
        read, write = [(0, lo)], (lo, start - start % block_size)
    elif mode == "none":
        lo, hi = 0, length
    elif req.refresh_step:  # everything but what an earlier turn of the conversation left in the cache
        lo, hi = req.reused, length
        read, write = [(0, lo)], (lo, length)
    else:
        lo = start - shift
        hi = length if mode == "prefix" else end
        read = [(0, lo)] + ([(end, length)] if mode == "dual" else [])
    positions = np.arange(lo, hi, dtype=np.int64)
    hidden = None
    if verify and not uncond:
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
    cap = store.capacity
    nb = len(requests)
    windows = [r.window() for r in requests]
    width = max(max(end - lo for lo, end in windows), 1)
    verify = [(rev := revision_policy(r)) is not None and rev.verifies for r in requests]
    cfg = [r.params.cfg_scale > 0 for r in requests]
    planned = any(r.cache_mode != "none" for r in requests) or any(verify)

    # --- the packed forward: cond sequences in batch order, then the unconditional copies
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
            force.append(seq.positions < r.prompt_len)
    seq_start = np.cumsum([0] + [s.num_tokens for s in seqs])
    up = Upload()
    up.add("gather", np.concatenate(gather), torch.int64)
    force_all = np.concatenate(force)
    up.add("force_mask", force_all, torch.bool)
    up.add("positions", np.concatenate([s.positions for s in seqs]), torch.int64)

    # --- rows and the padded matrices
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
        if cfg[i]:
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
    if cfg_row:
        up.add("cfg_hidden", np.concatenate(cfg_hidden), torch.int64)
        up.add("cfg_row", np.concatenate(cfg_row), torch.int64)
        up.add("cfg_scale", np.concatenate(cfg_scale), torch.float64)
    if verify_pad:
        up.add("verify_hidden", np.concatenate(verify_hidden), torch.int64)
        up.add("verify_pad", np.concatenate(verify_pad), torch.int64)

    # --- per-request settings
    p = [r.params for r in requests]
    seeds = [r.seed_bits for r in requests]
    up.add("seed", seeds, torch.int64)
    up.add("row_seed", np.asarray(seeds, dtype=np.int64)[row_req_all], torch.int64)
    temps = np.asarray([x.temperature for x in p], dtype=np.float64)
    up.add("row_temp", temps[row_req_all], torch.float32)
    raw = np.asarray([ORDERINGS[r.remasking].raw for r in requests])
    up.add("row_raw", raw[row_req_all], torch.bool)
    # LLaDA's confidence_eos_eot_inf as published: `logits_with_noise[:, :, eos] = logits[:, :, eot] = -inf` after
    # sampling. At temperature 0 `add_gumbel_noise` returns the logits tensor itself, so EOS leaves the confidence
    # softmax too; at temperature > 0 only EOT does.
    exclude = np.asarray([[eot_id, eos_id if x.temperature == 0 else -1] if x.confidence_eos_eot_inf else [-1, -1]
                          for x in p], dtype=np.int64)
    any_exclude = bool((exclude >= 0).any())
    if any_exclude:
        up.add("row_exclude", exclude[row_req_all], torch.int64)
    top_k = np.asarray([x.top_k or 0 for x in p], dtype=np.int64)
    top_p = np.asarray([x.top_p if x.top_p is not None else 1.0 for x in p], dtype=np.float64)
    eos_inf = np.asarray([x.logits_eos_inf for x in p])
    if top_k.any():
        up.add("row_top_k", top_k[row_req_all], torch.int64)
    if (top_p < 1).any():
        up.add("row_top_p", top_p[row_req_all], torch.float32)
    if eos_inf.any():
        up.add("row_eos_inf", eos_inf[row_req_all], torch.bool)
    up.add("nfe", [r.nfe for r in requests], torch.int64)
    up.add("block_step", [r.block_step for r in requests], torch.int64)
    up.add("block_col", [r.block_span[0] - windows[i][0] for i, r in enumerate(requests)], torch.int64)
    up.add("block_len", [r.block_span[1] - r.block_span[0] for r in requests], torch.int64)

    modes, kinds, thresholds, factors, gammas = [], [], [], [], []
    steps = max(x.steps_per_block for x in p)
    counts = np.zeros((nb, steps), dtype=np.int64)
    timesteps = np.ones((nb, steps + 1), dtype=np.float64)
    for i, r in enumerate(requests):
        rule = decoding_policy(r).rule(r)
        modes.append(rule.mode)
        kinds.append(rule.count_kind)
        thresholds.append(rule.threshold)
        factors.append(rule.factor)
        gammas.append(rule.eb_gamma)
        counts[i, :len(r.block_counts)] = r.block_counts
        if r.timesteps is not None:
            timesteps[i, :r.timesteps.shape[0]] = r.timesteps.numpy()
    up.add("mode", modes, torch.int32)
    up.add("count_kind", kinds, torch.int64)
    up.add("threshold", thresholds, torch.float32)
    up.add("factor", factors, torch.float32)
    up.add("gamma", gammas, torch.float32)
    up.add("spb", [x.steps_per_block for x in p], torch.int64)
    up.add("counts", counts, torch.int64)
    up.add("timesteps", timesteps, torch.float32)
    adaptive = [x.adaptive for x in p]
    up.add("adaptive", adaptive, torch.bool)
    ordering = [r.remasking for r in requests]
    for name, flags in (ord_flags := ordering_flags(ordering, adaptive, [x.alg_temp for x in p])).items():
        up.add(name, flags, torch.bool)
    ord_random, ord_origin, ord_alg = ord_flags["ord_uniform"], ord_flags["ord_coins"], ord_flags["ord_alg"]
    up.add("alg_temp", [x.alg_temp if (x.alg_temp or 0) > 0 else 1.0 for x in p], score_dtype)

    acting = [rev.name if (rev := revision_policy(r)) is not None else None for r in requests]
    revisions = tuple(sorted({a for a in acting if a is not None}))
    rev_kind = [0 if a is None else revisions.index(a) + 1 for a in acting]
    variants = [REMDM_VARIANTS[x.remdm_variant] for x in p]
    up.add("rev_kind", rev_kind, torch.int64)
    up.add("remdm_variant", variants, torch.int64)
    up.add("remdm_eta", [x.remdm_eta for x in p], torch.float64)
    up.add("verify_threshold", [x.verify_threshold for x in p], score_dtype)
    up.add("edit_margin", [x.edit_margin for x in p], score_dtype)

    t = up.finish(store.device)
    layout = TokenLayout.packed([s.num_tokens for s in seqs], block_size=block_size)
    if planned:
        layout.kv = AttentionPlan(cache, seqs, store.device)
    else:
        layout.cu_seqlens_device = upload(np.asarray(layout.cu_seqlens, dtype=np.int32), store.device)
    scores = score_statistics(ordering, [x.policy for x in p])
    host_rows, host_cols = np.nonzero(pad_valid)
    return StepPlan(
        key=key, requests=list(requests), batch=nb, width=width, num_rows=m, layout=layout, t=t,
        generation=store.generation, trash=store.trash,
        fused=fused and not cfg_row and not top_k.any() and not (top_p < 1).any() and not eos_inf.any(),
        any_hot=bool((temps > 0).any()), any_raw=bool(raw.any()), all_raw=bool(raw.all()), any_exclude=any_exclude,
        any_top_k=bool(top_k.any()), any_top_p=bool((top_p < 1).any()), any_eos_inf=bool(eos_inf.any()),
        any_cfg=bool(cfg_row), any_verify=bool(verify_pad), any_random=any(ord_random), any_origin=any(ord_origin),
        any_alg=any(ord_alg), revisions=revisions,
        any_remdm_conf=any(a == "remdm" and v == 2 for a, v in zip(acting, variants, strict=True)),
        any_snapshot=any(r.snapshots for r in requests), any_force=bool(force_all.any()),
        scores=tuple(sorted(scores)),
        host_slot=np.asarray([r.slot for r in requests], dtype=np.int64)[host_rows],
        host_pos=pad_pos[host_rows, host_cols], host_valid=pad_valid, score_dtype=score_dtype)
