"""Which candidate rows a step commits, for a whole batch at once.

Per request: a ranking score per candidate row (its ``remasking`` ordering), and the commit rule of its decoding
policy (:mod:`diffuse_engine.policies`); one :func:`ops.commit` call applies every request's rule.

Fixed steps rank by the ordering's confidence (or by confidence / alg_temp + Gumbel noise: sampling without
replacement from softmax(confidence / alg_temp), as Dream's ``torch.multinomial``) and commit the schedule's
count; Dream's ``origin`` commits the rows whose independent coin came up. The adaptive policies compare a
confidence in [0, 1] with their rule: the sampled token's probability, the top-1 - top-2 margin
(``topk_margin``) or exp(-entropy) (``entropy``); the EB-sampler also sums entropies.
"""

from __future__ import annotations

import torch

from .. import ops
from ..kernels.reference import COMMIT_TOPK, STREAM_ORDER, STREAM_REMASK, STREAM_TRANSFER
from ..policies import decoding_policy
from .request import Request
from .runner import HeadRows
from .schedule import dream_transfer_probability


def _row_keys(batch: list[Request], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.tensor(counts)
    seeds = torch.repeat_interleave(torch.tensor([r.seed_bits for r in batch], dtype=torch.int64), c)
    steps = torch.repeat_interleave(torch.tensor([r.nfe for r in batch], dtype=torch.int64), c)
    return seeds, steps


def select(batch: list[Request], rows: HeadRows) -> torch.Tensor:
    """Boolean ``[num_rows]``: the rows this step commits."""
    starts = rows.starts
    counts = [starts[i + 1] - starts[i] for i in range(len(batch))]
    num_rows = starts[-1]
    seeds, steps = _row_keys(batch, counts)

    score = rows.prob.clone()
    uniform = {}
    if any(r.remasking in ("random", "origin") and not r.params.adaptive for r in batch):
        uniform = {s: ops.counter_uniform(seeds, steps, rows.position, s) for s in (STREAM_REMASK, STREAM_TRANSFER)}
    gumbel = None
    if any((r.params.alg_temp or 0) > 0 and not r.params.adaptive for r in batch):
        gumbel = ops.counter_gumbel(seeds, steps, rows.position, STREAM_ORDER)

    modes, count, threshold, factor, gamma = [], [], [], [], []
    for i, r in enumerate(batch):
        a, b = starts[i], starts[i + 1]
        rule = decoding_policy(r).rule(r, b - a)
        if r.remasking == "topk_margin":
            score[a:b] = rows.margin[a:b]
        elif r.remasking == "entropy":
            score[a:b] = rows.neg_entropy[a:b].exp() if r.params.adaptive else rows.neg_entropy[a:b]
        elif r.remasking == "random" and not r.params.adaptive:
            score[a:b] = uniform[STREAM_REMASK][a:b].to(score.dtype)
        if r.remasking == "origin" and not r.params.adaptive:
            coin = uniform[STREAM_TRANSFER][a:b] < dream_transfer_probability(r.block_step, r.timesteps)
            score[a:b] = coin.to(score.dtype)
            rule = type(rule)(COMMIT_TOPK, count=int(coin.sum()))
        elif (r.params.alg_temp or 0) > 0 and not r.params.adaptive:
            score[a:b] = score[a:b] / r.params.alg_temp + gumbel[a:b].to(score.dtype)
        modes.append(rule.mode)
        count.append(rule.count)
        threshold.append(rule.threshold)
        factor.append(rule.factor)
        gamma.append(rule.eb_gamma)
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.bool)
    entropy = (-rows.neg_entropy).clamp(min=0) if rows.neg_entropy is not None else torch.zeros(num_rows)
    scratch = torch.zeros(num_rows, dtype=torch.int64)  # the rows' own slots: only `committed` is used
    committed, _ = ops.commit(ops.CommitBatch(
        canvas=scratch, row_offsets=torch.tensor(starts, dtype=torch.int64),
        row_index=torch.arange(num_rows, dtype=torch.int64), token=rows.token.to(torch.int64), score=score,
        entropy=entropy.to(score.dtype), mode=torch.tensor(modes, dtype=torch.int32),
        count=torch.tensor(count, dtype=torch.int32), threshold=torch.tensor(threshold, dtype=torch.float32),
        factor=torch.tensor(factor, dtype=torch.float32), eb_gamma=torch.tensor(gamma, dtype=torch.float32),
        mask_id=0), max_rows=max(counts) if counts else 0)
    return committed
