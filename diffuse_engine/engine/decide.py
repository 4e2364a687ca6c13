"""Which candidate rows a step commits, for a whole batch at once.

Per request: a confidence per candidate row (by its ``remasking`` ordering), a count from its schedule, and
then the top-``count`` rows by confidence (or by confidence / alg_temp + Gumbel noise: sampling without
replacement from softmax(confidence / alg_temp), as Dream's ``torch.multinomial``), or, for ``origin``, an
independent coin per row. Ranking is one sort over a padded ``[requests, max_rows]`` matrix.
"""

from __future__ import annotations

import torch

from .. import ops
from ..kernels.reference import STREAM_ORDER, STREAM_REMASK, STREAM_TRANSFER
from .request import Request
from .runner import HeadRows
from .schedule import dream_transfer_count, dream_transfer_probability


def _row_keys(batch: list[Request], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.tensor(counts)
    seeds = torch.repeat_interleave(torch.tensor([r.seed_bits for r in batch], dtype=torch.int64), c)
    steps = torch.repeat_interleave(torch.tensor([r.nfe for r in batch], dtype=torch.int64), c)
    return seeds, steps


def step_count(r: Request, num_candidates: int) -> int:
    """Tokens request ``r`` commits in its current step (its family's schedule)."""
    if r.arch == "dream":
        return dream_transfer_count(num_candidates, r.block_step, r.timesteps)
    return r.block_counts[r.block_step]


def select(batch: list[Request], rows: HeadRows) -> torch.Tensor:
    """Boolean ``[num_rows]``: the rows this step commits."""
    starts = rows.starts
    counts = [starts[i + 1] - starts[i] for i in range(len(batch))]
    num_rows = starts[-1]
    seeds, steps = _row_keys(batch, counts)
    req_of_row = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts))

    conf = rows.prob.clone()
    by_name = {name: score for name, score in (("topk_margin", rows.margin), ("entropy", rows.neg_entropy))
               if score is not None}
    need_uniform = False
    for i, r in enumerate(batch):
        a, b = starts[i], starts[i + 1]
        if r.remasking in by_name:
            conf[a:b] = by_name[r.remasking][a:b]
        elif r.remasking in ("random", "origin"):
            need_uniform = True
    if need_uniform:
        uniform = {s: ops.counter_uniform(seeds, steps, rows.position, s) for s in (STREAM_REMASK, STREAM_TRANSFER)}
        for i, r in enumerate(batch):
            a, b = starts[i], starts[i + 1]
            if r.remasking == "random":
                conf[a:b] = uniform[STREAM_REMASK][a:b].to(conf.dtype)

    alg_temp = [r.params.alg_temp or 0.0 for r in batch]
    if any(t > 0 for t in alg_temp):
        gumbel = ops.counter_gumbel(seeds, steps, rows.position, STREAM_ORDER)
        for i, t in enumerate(alg_temp):
            if t > 0:
                a, b = starts[i], starts[i + 1]
                conf[a:b] = conf[a:b] / t + gumbel[a:b].to(conf.dtype)

    selected = torch.zeros(num_rows, dtype=torch.bool)
    take = torch.zeros(len(batch), dtype=torch.int64)
    ranked = []
    for i, r in enumerate(batch):
        a, b = starts[i], starts[i + 1]
        if r.remasking == "origin":
            p = dream_transfer_probability(r.block_step, r.timesteps)
            selected[a:b] = uniform[STREAM_TRANSFER][a:b] < p
        else:
            take[i] = min(step_count(r, b - a), b - a)
            ranked.append(i)
    if ranked and num_rows:
        width = max(counts)
        matrix = torch.full((len(batch), width), float("-inf"), dtype=conf.dtype)
        local = torch.arange(num_rows) - torch.tensor(starts[:-1])[req_of_row]
        matrix[req_of_row, local] = conf
        order = torch.argsort(matrix, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(width).expand(len(batch), width).contiguous())
        chosen = rank < take[:, None]
        is_ranked = torch.zeros(len(batch), dtype=torch.bool)
        is_ranked[ranked] = True
        pick = chosen[req_of_row, local] & is_ranked[req_of_row]
        selected |= pick
    return selected
