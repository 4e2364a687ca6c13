"""ReMDM-style re-masking (remasking diffusion, Wang et al. 2025): each committed token of the current block goes
back to [MASK] with probability sigma_t, so that later steps can decode it again with more context.

With unmasked fractions alpha_t (now) and alpha_s (after this step's commits), sigma_t <= sigma_max =
min(1, (1 - alpha_s) / alpha_t). Variants: ``cap`` sigma = min(eta, sigma_max); ``rescale`` sigma =
eta * sigma_max; ``conf`` spreads eta * sigma_max * (committed count) over the tokens by softmax(-confidence at
commit), so the least confident are re-masked first. The coins are counter-based (seed, step, position). The
expected commits of this step: what is masked spread over the steps left (fixed policy), or
``max(1, masked // (block_length - block_step))`` (adaptive).
"""

from __future__ import annotations

import torch

from .. import ops
from ..kernels.reference import STREAM_REVISE
from .base import Revision, RevisionContext


def sigma(ctx: RevisionContext) -> torch.Tensor:
    """The re-masking probability of every cell ``[B, W]`` (fp64; meaningful where ``ctx.committed``)."""
    c = ctx.committed.sum(1).double()
    n = ctx.block_len.double()
    masked = ctx.masked.sum(1)
    steps_left = (ctx.steps_per_block - ctx.block_step).clamp(min=1)
    fixed = -torch.div(-masked, steps_left, rounding_mode="floor")
    adaptive = torch.div(masked, (ctx.block_len - ctx.block_step).clamp(min=1), rounding_mode="floor").clamp(min=1)
    expected = torch.where(ctx.adaptive, adaptive, fixed).double()
    alpha_t = c / n
    alpha_s = torch.clamp((c + expected) / n, max=1.0)
    sigma_max = torch.where(alpha_t <= 0, 0.0, ((1.0 - alpha_s) / alpha_t.clamp(min=1e-300)).clamp(0.0, 1.0))
    eta = ctx.remdm_eta
    out = torch.where(ctx.remdm_variant == 0, torch.minimum(eta, sigma_max), eta * sigma_max)[:, None]
    out = out.expand(ctx.committed.shape)
    if ctx.conf_variant:
        weight = torch.softmax(torch.where(ctx.committed, -ctx.conf.double(), float("-inf")), dim=1).nan_to_num(0.0)
        spread = ((eta * sigma_max * c)[:, None] * weight).clamp(max=1.0)
        out = torch.where((ctx.remdm_variant == 2)[:, None], spread, out)
    return out


class ReMDM:
    name = "remdm"
    verifies = False

    def revise(self, ctx: RevisionContext) -> Revision:
        u = ops.counter_uniform(ctx.seed, ctx.step, ctx.position, STREAM_REVISE).double()
        return Revision(ctx.committed & (u < sigma(ctx)))
