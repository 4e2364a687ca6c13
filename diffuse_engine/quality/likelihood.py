"""Log-likelihoods under a masked-diffusion model: the Monte-Carlo estimate of the ELBO that LLaDA reports
(``eval_llada.py``; the LLaDA paper, Appendix B.6), used by the lm-evaluation-harness integration for
``loglikelihood`` requests and by :func:`~.evaluate.elbo_bits`.

For a prefix p and a continuation c of length L, each sample draws how many of c's tokens to mask, l, masks that
many at random positions of c (p stays observed), and scores the masked tokens:
``log p(c | p) >= E_l [ (L / l) * sum over masked i of log p_theta(c_i | noisy) ]``. LLaDA draws the ``mc_num``
samples' l evenly spread over 1..L from one random start (a stratified draw, lower variance than independent
draws) and evaluates ``batch_size`` samples in one forward. A shifted-logit model (Dream) reads the prediction of
position i from row i - 1 (:func:`masked_nll`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import DiffusionLM


def masked_nll(model: DiffusionLM, noisy: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats, float64) of ``target`` at every ``masked`` position of ``noisy``
    ([batch, seq] each), in the order of ``masked.nonzero()``. Shifted-logit models read row i - 1 for position i
    (position 0 reads row 0, as Dream's generation does). Only the masked rows are upcast (to float64)."""
    logits = model(noisy.to(model.device))
    where = masked.nonzero()
    rows = (where[:, 1] - 1).clamp_(min=0) if model.config.shifted_logits else where[:, 1]
    picked = logits[where[:, 0].to(logits.device), rows.to(logits.device)].double().cpu()  # only the masked rows
    return F.cross_entropy(picked, target[masked], reduction="none")


def stratified_mask_counts(num: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """LLaDA's ``_forward_process`` counts: ``num`` mask counts in 1..``length``, evenly spread from a random
    start and wrapped around."""
    k = int(torch.randint(1, length + 1, (), generator=gen))
    counts = torch.round(torch.linspace(float(k), k + (num - 1) * (length / num), steps=num)).long()
    return (counts - 1) % length + 1


@torch.no_grad()
def continuation_loglikelihood(model: DiffusionLM, prefix: list[int], continuation: list[int], *, mc_num: int = 128,
                               batch_size: int = 32, seed: int = 0) -> float:
    """The Monte-Carlo ELBO estimate of ``log p(continuation | prefix)`` (nats) with ``mc_num`` samples, ``batch_size``
    per forward (``mc_num`` must be a multiple of it, as in LLaDA's evaluation), seeded by ``seed``."""
    if not continuation:
        raise ValueError("the continuation is empty: there is nothing to score.")
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size}).")
    gen = torch.Generator().manual_seed(seed)
    seq = torch.tensor(list(prefix) + list(continuation), dtype=torch.long)
    p, length = len(prefix), len(continuation)
    mask_id = model.config.mask_token_id
    total = 0.0
    for _ in range(mc_num // batch_size):
        counts = stratified_mask_counts(batch_size, length, gen)
        ranks = torch.rand(batch_size, length, generator=gen).argsort(dim=1).argsort(dim=1)
        masked = torch.zeros(batch_size, seq.numel(), dtype=torch.bool)
        masked[:, p:] = ranks < counts[:, None]
        x = seq.expand(batch_size, -1)
        noisy = torch.where(masked, torch.full_like(x, mask_id), x)
        nll = masked_nll(model, noisy, x, masked)
        weights = (length / counts.double())[masked.nonzero()[:, 0]]
        total += float((nll * weights).sum()) / batch_size
    return -total / (mc_num // batch_size)
