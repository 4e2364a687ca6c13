"""The sampling head in plain torch without a host synchronisation: the engine's torch path for the statistics of
logits rows. Results are bit-identical to :func:`kernels.reference.sample_and_score` (the oracle), which inspects
its tensors on the host (``.any()``, ``nonzero``, a raise on bad rows); here the caller says on the host what the
batch uses (:class:`RowFlags`), and bad rows come back flagged in ``invalid`` instead of raising.

The only deviations from the reference's code path are value-preserving: the temperature division and the
filters run for every row when any row needs them (a division by 1 and a disabled filter leave a row's bits
unchanged), Gumbel noise is drawn for every row when some are hot on CUDA (a gather of the hot rows would
synchronise), and excluded confidence columns are set through a mask (a scatter of -inf where the reference
indexes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import STREAM_SAMPLE, counter_gumbel, filter_logits

ENTROPY_EPS = 1e-10  # Dream's q log(q + eps): the negative entropy of the unfused head


@dataclass(slots=True, frozen=True)
class RowFlags:
    """What the rows of a call use, known on the host: any row with temperature > 0, raw-logit confidence (any /
    all rows), excluded confidence columns, top-k / top-p filters, and the scores to return."""

    any_hot: bool
    any_raw: bool
    all_raw: bool
    any_exclude: bool
    any_top_k: bool
    any_top_p: bool
    scores: tuple[str, ...] = ("margin", "neg_entropy")


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                position: torch.Tensor, flags: RowFlags, *, top_k: torch.Tensor | None = None,
                top_p: torch.Tensor | None = None, raw_confidence: torch.Tensor | None = None,
                conf_exclude: torch.Tensor | None = None, entropy_eps: float = ENTROPY_EPS) -> dict[str, torch.Tensor]:
    """:func:`kernels.reference.sample_and_score` for logits ``[M, V]`` with per-row tensors on the logits' device,
    plus ``invalid`` (int32 ``[M]``: NaN / +inf logits, or no finite entry), never synchronising on CUDA."""
    m, v = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(work)
    temperature = temperature.to(dtype=work)
    hot = temperature > 0
    z = x / torch.where(hot, temperature, torch.ones_like(temperature))[:, None] if flags.any_hot else x
    if flags.any_top_k or flags.any_top_p:
        tk = top_k if top_k is not None else torch.zeros(m, dtype=torch.int64, device=x.device)
        tp = top_p.to(work) if top_p is not None else torch.ones(m, dtype=work, device=x.device)
        z = filter_logits(z, tk, tp, any_top_p=flags.any_top_p, any_top_k=flags.any_top_k)
    noisy = z
    if flags.any_hot:
        if x.device.type == "cpu":  # a gather of the hot rows costs nothing on the host
            rows = hot.nonzero().squeeze(1)
            g = counter_gumbel(seed[rows], step[rows], position[rows], STREAM_SAMPLE, v).to(work)
            noisy = z.clone()
            noisy[rows] = z[rows] + g
        else:
            g = counter_gumbel(seed, step, position, STREAM_SAMPLE, v).to(work)
            noisy = torch.where(hot[:, None], z + g, z)

    q_logits = z
    if flags.any_raw and raw_confidence is not None:
        raw = x
        if flags.any_exclude and conf_exclude is not None:
            cols = conf_exclude.reshape(m, -1)
            hit = torch.zeros((m, v), dtype=torch.uint8, device=x.device)
            hit.scatter_reduce_(1, cols.clamp(min=0), (cols >= 0).to(torch.uint8), reduce="amax")
            raw = x.masked_fill(hit.bool(), float("-inf"))
        q_logits = raw if flags.all_raw else torch.where(raw_confidence[:, None], raw, z)
    if noisy is q_logits:  # greedy on the scoring logits: one pass gives the maximum and its (first) column
        mx, token = q_logits.max(dim=-1, keepdim=True)
        token = token.squeeze(1)
    else:
        token = noisy.argmax(dim=-1)
        mx = q_logits.max(dim=-1, keepdim=True).values
    e = torch.sub(q_logits, mx).exp_()  # one [M, V] buffer, not two
    s = e.sum(dim=-1)
    prob = e.gather(-1, token[:, None]).squeeze(1) / s
    top1 = 1.0 / s
    invalid = ~(torch.isfinite(mx.squeeze(1)) & torch.isfinite(s) & (s > 0))
    out = {"token": token, "prob": prob, "top1": top1, "invalid": invalid.to(torch.int32)}
    if "margin" in flags.scores:
        out["margin"] = top1 - (e.topk(2, dim=-1).values[:, 1] / s if v > 1 else 0.0)
    if "neg_entropy" in flags.scores:
        q = e / s[:, None]
        out["neg_entropy"] = torch.special.xlogy(q, q + entropy_eps).sum(dim=-1)
    return out
