"""ReMDM-style re-masking (remasking diffusion, Wang et al. 2025): each committed token of the current block goes
back to [MASK] with probability sigma_t, so that later steps can decode it again with more context.

With unmasked fractions alpha_t (now) and alpha_s (after this step's commits), sigma_t <= sigma_max =
min(1, (1 - alpha_s) / alpha_t). Variants: ``cap`` sigma = min(eta, sigma_max); ``rescale`` sigma =
eta * sigma_max; ``conf`` spreads eta * sigma_max * (committed count) over the tokens by softmax(-confidence at
commit), so the least confident are re-masked first. The coins are counter-based (seed, step, position).
"""

from __future__ import annotations

import torch

from .. import ops
from ..kernels.reference import STREAM_REVISE
from .base import Revision, ceil_div, steps_left, uniform_sigma


class ReMDM:
    name = "remdm"
    verifies = False

    def revise(self, req, committed: torch.Tensor, verify, index: int) -> Revision:
        c = committed.numel()
        if c == 0:
            return Revision([], {})
        p = req.params
        start, end = req.block_span
        n = end - start
        masked = req.block_masked()
        expected = ceil_div(masked, steps_left(req)) if not p.adaptive else max(1, masked // max(1, n - req.block_step))
        sigma_max = uniform_sigma(c / n, min(1.0, (c + expected) / n))
        if p.remdm_variant == "cap":
            sigma = torch.full((c,), min(p.remdm_eta, sigma_max), dtype=torch.float64)
        elif p.remdm_variant == "rescale":
            sigma = torch.full((c,), p.remdm_eta * sigma_max, dtype=torch.float64)
        else:
            weight = torch.softmax(-req.commit_conf[committed].double(), 0)
            sigma = (p.remdm_eta * sigma_max * c * weight).clamp(max=1.0)
        seeds = torch.full((c,), req.seed_bits, dtype=torch.int64)
        steps = torch.full((c,), req.nfe, dtype=torch.int64)
        u = ops.counter_uniform(seeds, steps, committed, STREAM_REVISE).double()
        return Revision(committed[u < sigma].tolist(), {})
