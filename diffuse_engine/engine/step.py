"""One denoising step on the device: forward, head, decisions, commit, and the packed result for the host.

Nothing here reads a device value on the host: shapes come from the plan, choices from its host flags, and every
per-request quantity (candidate counts, schedules, revision probabilities) is a tensor. So the whole function can
run ahead of the host, be captured in a CUDA graph, and end in one asynchronous copy (:func:`pack_outputs`).

Decisions work on the plan's padded ``[B, W]`` matrices (request b's window in row b). A step:

1. gathers the fresh tokens from the canvas store and runs the model (:meth:`DiffusionLM.hidden_states`);
2. computes the statistics of the window rows (sampled token, probability, margin / entropy; ``invalid`` for
   rows with non-finite logits), fused with the LM head where the plan allows;
3. scores the candidates (still-masked window cells) by each request's ordering, and counts its commit;
4. applies revision (re-mask / replace committed tokens of the block; verification scores from the same forward);
5. commits through :func:`ops.commit` on the candidates compacted to the front of each request's segment;
6. writes confidences, advances the per-request step counters and packs what the host needs.
"""

from __future__ import annotations

import torch

from .. import ops
from ..kernels.reference import STREAM_ORDER, STREAM_REMASK, STREAM_TRANSFER
from ..kernels.sample_torch import ENTROPY_EPS, RowFlags, sample_rows
from ..models import DiffusionLM
from ..policies import REVISION, RevisionContext
from ..policies.fixed import origin_probability, step_counts
from .canvas import CanvasStore
from .plan import StepPlan


def forward(model: DiffusionLM, plan: StepPlan, store: CanvasStore, mask_id: int) -> torch.Tensor:
    t = plan.t
    ids = store.tokens[t["gather"]]
    if plan.any_force:
        ids = torch.where(t["force_mask"], mask_id, ids)
    return model.hidden_states(ids, t["positions"], plan.layout)


def head(model: DiffusionLM, plan: StepPlan, hidden: torch.Tensor, eos_id: int,
         rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Statistics of the plan's M window rows, or of the rows ``rows`` (indices into them: the step's candidates,
    which the host knows from its mirror) (keys of :func:`ops.row_stats`, scores in the plan's score dtype)."""
    t = {k: v for k, v in plan.t.items() if k.startswith("row_") and k != "row_pad"}
    if rows is not None:
        t = {k: v[rows] for k, v in t.items()}
    step = plan.t["nfe"][t["row_req"]]
    conf_exclude = t.get("row_exclude")
    args = (t["row_temp"], t["row_seed"], step, t["row_pos"])
    flags = RowFlags(plan.any_hot, plan.any_raw, plan.all_raw, plan.any_exclude, plan.any_top_k, plan.any_top_p,
                     plan.scores)
    if plan.fused or (model.tp is not None and plan.head_eligible):
        # The fused head; under tensor parallelism the vocabulary-parallel head, with the entropy of the head the
        # same step would use on one device (exact when fused or on CUDA in fp32, Dream's eps otherwise).
        exact = plan.fused or (hidden.device.type == "cuda" and hidden.dtype != torch.float64)
        return model.head_stats(hidden, t["row_hidden"], *args, raw_confidence=t["row_raw"],
                                conf_exclude=conf_exclude, entropy_eps=0.0 if exact else ENTROPY_EPS, flags=flags)
    logits = model.logits_at(hidden, t["row_hidden"])
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(work)
    if plan.any_cfg:  # (never with a row subset: see ModelRunner.candidate_rows)
        un = model.logits_at(hidden, plan.t["cfg_hidden"]).to(work)
        cond = logits[plan.t["cfg_row"]]
        scale = plan.t["cfg_scale"].to(work)[:, None]
        logits = logits.index_copy(0, plan.t["cfg_row"], un + (scale + 1) * (cond - un))
    if plan.any_eos_inf:
        logits[:, eos_id] = torch.where(t["row_eos_inf"], float("-inf"), logits[:, eos_id])
    if logits.device.type == "cuda" and not (plan.any_top_k or plan.any_top_p) and work == torch.float32:
        return ops.row_stats(logits, torch.arange(logits.shape[0], device=logits.device), *args,
                             raw_confidence=t["row_raw"], conf_exclude=conf_exclude, check=False)
    return sample_rows(logits, *args, flags, top_k=t.get("row_top_k"), top_p=t.get("row_top_p"),
                       raw_confidence=t["row_raw"], conf_exclude=conf_exclude)


def _place(plan: StepPlan, x: torch.Tensor, fill, at: torch.Tensor) -> torch.Tensor:
    """Values ``x`` placed at the cells ``at`` (flat indices) of a ``[B, W]`` matrix, ``fill`` elsewhere."""
    out = torch.full((plan.batch * plan.width,), fill, dtype=x.dtype, device=x.device)
    return out.index_copy(0, at, x).view(plan.batch, plan.width)


def _verification(model: DiffusionLM, plan: StepPlan, hidden: torch.Tensor, cur: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leave-one-out scores of the verified block cells, as [B, W] matrices: probability of the current token,
    and the most probable token and its probability (padding: 1, -1, 0)."""
    t = plan.t
    logits = model.logits_at(hidden, t["verify_hidden"])
    probs = torch.softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
    top_prob, top_token = probs.max(-1)
    at = t["verify_pad"]
    current = cur.reshape(-1)[at].clamp(min=0, max=probs.shape[1] - 1)
    p_current = probs.gather(1, current[:, None])[:, 0]
    return (_place(plan, p_current.to(dtype), 1.0, at), _place(plan, top_token, -1, at),
            _place(plan, top_prob.to(dtype), 0.0, at))


def decide(model: DiffusionLM, plan: StepPlan, store: CanvasStore, hidden: torch.Tensor,
           stats: dict[str, torch.Tensor], mask_id: int, eos_id: int, eot_id: int | None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 3 to 6 of the module docstring; returns the packed int32 result (:func:`pack_outputs`)."""
    t = plan.t
    b, w = plan.batch, plan.width
    flat = store.tokens
    dtype = plan.score_dtype
    cur = flat[t["pad_flat"]]
    valid = t["pad_valid"]
    is_mask = (cur == mask_id) & valid
    at = t["row_pad"] if rows is None else t["row_pad"][rows]  # where the head's rows sit in the matrices
    invalid = _place(plan, stats["invalid"].to(torch.bool), False, at)
    cand = is_mask & ~invalid
    prob = _place(plan, stats["prob"].to(dtype), 0.0, at)
    token = _place(plan, stats["token"].to(torch.int64), mask_id, at)
    seed = t["seed"][:, None].expand(b, w)
    stepk = t["nfe"][:, None].expand(b, w)
    pos = t["pad_pos"]

    # 3. scores by ordering (policies/ordering.py), and each request's count
    score, neg_entropy, coins = _scores(plan, stats, at, prob, seed, stepk, pos)
    n_cand = cand.sum(1)
    count = step_counts(t["count_kind"], t["block_step"], t["spb"], t["counts"], t["timesteps"], n_cand,
                        (coins & cand).sum(1) if coins is not None else None, t["factor"])

    # 4. revision of the block's committed cells (before this step's commits, which only fill masked cells)
    revised = _revise(model, plan, store, hidden, cur, is_mask, seed, stepk, pos, mask_id) if plan.revisions else None

    # 5. commit: candidates first in each request's segment (ascending position), everything else after the last
    entropy = (-neg_entropy).clamp(min=0) if neg_entropy is not None else torch.zeros_like(score)
    committed = _commit(plan, store, cand, n_cand, token, score, entropy, count, mask_id)

    # 6. confidences, counters, the host's copy
    store.conf.index_put_((t["pad_flat"],), torch.where(committed, prob.float(), store.conf[t["pad_flat"]]))
    t["nfe"].add_(1)
    t["block_step"].add_(1)
    return pack_outputs(plan, store, committed, revised, invalid & is_mask, mask_id, eos_id, eot_id)


def _scores(plan: StepPlan, stats: dict[str, torch.Tensor], at: torch.Tensor, prob: torch.Tensor, seed: torch.Tensor,
            stepk: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Each candidate's score ``[B, W]``: the source of its request's ordering (``t["ord_<source>"]``; ``prob``
    elsewhere), perturbed for Dream's ``alg_temp``; also the negative entropy and the origin coins when computed."""
    t = plan.t
    dtype = prob.dtype
    score = prob
    if "margin" in stats and "margin" in plan.scores:
        score = torch.where(t["ord_margin"][:, None], _place(plan, stats["margin"].to(dtype), 0.0, at), score)
    neg_entropy = _place(plan, stats["neg_entropy"].to(dtype), 0.0, at) if "neg_entropy" in plan.scores else None
    if neg_entropy is not None:
        score = torch.where(t["ord_neg_entropy"][:, None], neg_entropy, score)
        score = torch.where(t["ord_exp_neg_entropy"][:, None], neg_entropy.exp(), score)
    if plan.any_random:
        u = ops.counter_uniform(seed, stepk, pos, STREAM_REMASK).to(dtype)
        score = torch.where(t["ord_uniform"][:, None], u, score)
    coins = None
    if plan.any_origin:
        p_coin = origin_probability(t["block_step"], t["spb"], t["timesteps"])
        u = ops.counter_uniform(seed, stepk, pos, STREAM_TRANSFER)
        coins = (u < p_coin[:, None]) & t["ord_coins"][:, None]
        score = torch.where(t["ord_coins"][:, None], coins.to(dtype), score)
    if plan.any_alg:
        g = ops.counter_gumbel(seed, stepk, pos, STREAM_ORDER).to(dtype)
        score = torch.where(t["ord_alg"][:, None], score / t["alg_temp"][:, None] + g, score)
    return score, neg_entropy, coins


def _revise(model: DiffusionLM, plan: StepPlan, store: CanvasStore, hidden: torch.Tensor, cur: torch.Tensor,
            is_mask: torch.Tensor, seed: torch.Tensor, stepk: torch.Tensor, pos: torch.Tensor,
            mask_id: int) -> torch.Tensor:
    """Apply each request's revision policy to its block's committed cells; returns the revised cells."""
    t = plan.t
    committed = t["pad_in_block"] & t["pad_valid"] & (cur != mask_id)
    p_cur = top_tok = top_prob = None
    if plan.any_verify:
        p_cur, top_tok, top_prob = _verification(model, plan, hidden, cur, plan.score_dtype)
    ctx = RevisionContext(committed, t["pad_in_block"] & is_mask, cur, store.conf[t["pad_flat"]], seed, stepk, pos,
                          t["block_len"], t["block_step"], t["spb"], t["adaptive"], t["remdm_variant"],
                          t["remdm_eta"], t["verify_threshold"], t["edit_margin"], p_cur, top_tok, top_prob,
                          mask_id, plan.any_remdm_conf)
    remask = torch.zeros_like(committed)
    new = cur
    for code, name in enumerate(plan.revisions, start=1):
        mine = (t["rev_kind"] == code)[:, None]
        rev = REVISION[name].revise(ctx)
        remask = remask | (mine & rev.remask)
        if rev.replace is not None:
            new = torch.where(mine & rev.replace, rev.replace_token, new)
    revised = remask | (new != cur)
    new = torch.where(remask, mask_id, new)
    store.tokens.index_put_((t["pad_flat"],), new)
    store.conf.index_put_((t["pad_flat"],), torch.where(remask, 0.0, ctx.conf))
    return revised


def _commit(plan: StepPlan, store: CanvasStore, cand: torch.Tensor, n_cand: torch.Tensor, token: torch.Tensor,
            score: torch.Tensor, entropy: torch.Tensor, count: torch.Tensor, mask_id: int) -> torch.Tensor:
    """One :func:`ops.commit` call for the batch; returns the committed cells ``[B, W]``."""
    t = plan.t
    b, w = plan.batch, plan.width
    n = b * w
    c = cand.reshape(-1)
    offsets = torch.zeros(b + 1, dtype=torch.int64, device=cand.device)
    offsets[1:] = n_cand.cumsum(0)
    within = cand.to(torch.int64).cumsum(1) - 1
    dest_c = (offsets[:-1, None] + within).reshape(-1)
    rest = (~c).to(torch.int64).cumsum(0) - 1
    dest = torch.where(c, dest_c, offsets[-1] + rest)
    perm = torch.empty(n, dtype=torch.int64, device=cand.device).scatter_(
        0, dest, torch.arange(n, dtype=torch.int64, device=cand.device))
    index = torch.where(c, t["pad_flat"].reshape(-1), store.trash)[perm]
    score_c = score.reshape(-1)[perm]
    if score_c.dtype != torch.float64:
        score_c = score_c.float()
    batch = ops.CommitBatch(store.tokens, offsets, index.contiguous(), token.reshape(-1)[perm].contiguous(),
                            score_c.contiguous(), entropy.reshape(-1)[perm].to(score_c.dtype).contiguous(),
                            t["mode"], count.to(torch.int32), t["threshold"], t["factor"], t["gamma"], mask_id)
    done, _ = ops.commit(batch, max_rows=w)
    return torch.empty(n, dtype=torch.bool, device=cand.device).scatter_(0, perm, done).view(b, w)


def pack_outputs(plan: StepPlan, store: CanvasStore, committed: torch.Tensor, revised: torch.Tensor | None,
                 bad: torch.Tensor, mask_id: int, eos_id: int, eot_id: int | None) -> torch.Tensor:
    """The step's result for the host, one int32 tensor: per request the counters of :data:`.plan.COUNTERS`, then
    the window's tokens after the step ``[B, W]``, a change code per cell (1 committed, 2 revised), and with
    snapshots the cells' confidences (fp32 bits)."""
    t = plan.t
    new = store.tokens[t["pad_flat"]]
    in_block = t["pad_in_block"]
    masked_blk = (new == mask_id) & in_block
    ends = (new == eos_id) if eot_id is None else (new == eos_id) | (new == eot_id)
    cols = torch.arange(plan.width, device=new.device)
    first = torch.where(masked_blk, cols, plan.width).amin(1)
    first = torch.where(first == plan.width, t["block_col"] + t["block_len"], first) - t["block_col"]
    code = committed.to(torch.int32)
    if revised is not None:
        code = code + 2 * revised.to(torch.int32)
    counters = torch.stack((masked_blk.sum(1), first, (ends & in_block).any(1).to(torch.int64), bad.sum(1),
                            revised.sum(1) if revised is not None else torch.zeros_like(first)), dim=1)
    parts = [counters.to(torch.int32).reshape(-1), new.to(torch.int32).reshape(-1), code.reshape(-1)]
    if plan.any_snapshot:
        parts.append(store.conf[t["pad_flat"]].view(torch.int32).reshape(-1))
    return torch.cat(parts)
