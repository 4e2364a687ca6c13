"""Fixed steps: the model family's published schedule (LLaDA's per-step counts, Dream's timesteps).

How many candidates a step commits depends on the step (and, for Dream, on how many are still masked), so the count
is computed on the device from the request's schedule (:func:`step_counts`), one kind per request:

- ``COUNT_TABLE``: LLaDA's per-step counts of the block (``Request.block_counts``, from its masked positions);
- ``COUNT_SPREAD``: with a revision policy, revised tokens come back as candidates: what is masked is spread over
  the steps left (equal to LLaDA's counts while nothing has been re-masked);
- ``COUNT_DREAM``: Dream's ``int(n * (1 - s / t))`` of the n candidates (fp32), all of them at the last step;
- ``COUNT_COINS``: an ordering drawing coins (Dream's ``origin``): the candidates whose independent coin came up;
- ``COUNT_FRACTION``: a fraction (the rule's ``factor``) of the candidates, at least one (for other policies).
"""

from __future__ import annotations

import torch

from .base import (
    COMMIT_TOPK,
    COUNT_COINS,
    COUNT_DREAM,
    COUNT_FRACTION,
    COUNT_NONE,
    COUNT_SPREAD,
    COUNT_TABLE,
    CommitRule,
)
from .ordering import ORDERINGS
from .schedule import dream_schedule
from .state import BlockState


class FixedSteps:
    name = "fixed"
    adaptive = False
    needs: tuple[str, ...] = ()

    def rule(self, state: BlockState) -> CommitRule:
        if ORDERINGS[state.ordering].coins:
            kind = COUNT_COINS
        elif dream_schedule(state.arch):
            kind = COUNT_DREAM
        elif state.params.revision is not None:
            kind = COUNT_SPREAD
        else:
            kind = COUNT_TABLE
        return CommitRule(COMMIT_TOPK, count_kind=kind)

    def block_done(self, state: BlockState) -> bool:
        # A block-diffusion model's block ends when nothing is left to commit (SDAR's loop; its first block,
        # which starts inside the prompt, can run out early). LLaDA and Dream run every scheduled step, as
        # published (Dream's ``origin`` coins can empty a block early; the NFE stays that of the reference).
        return state.block_step >= state.params.steps_per_block or (state.block_diffusion and state.masked == 0)


def step_counts(kind: torch.Tensor, block_step: torch.Tensor, steps_per_block: torch.Tensor, table: torch.Tensor,
                timesteps: torch.Tensor, num_candidates: torch.Tensor, coins: torch.Tensor | None,
                fraction: torch.Tensor | None = None) -> torch.Tensor:
    """Per request ``[B]``: the count of this step (0 for ``COUNT_NONE``, the adaptive rules). ``table`` ``[B, T]``
    holds LLaDA's counts, ``timesteps`` ``[B, T + 1]`` Dream's fp32 schedule, ``coins`` ``[B]`` the origin coins that
    came up among the candidates (None when no request uses them), ``fraction`` ``[B]`` the fractions of
    ``COUNT_FRACTION`` (None: no request uses it)."""
    last = block_step >= steps_per_block - 1
    at = block_step[:, None]
    llada = table.gather(1, at.clamp(max=table.shape[1] - 1))[:, 0]
    spread = -torch.div(-num_candidates, (steps_per_block - block_step).clamp(min=1), rounding_mode="floor")
    t = timesteps.gather(1, at.clamp(max=timesteps.shape[1] - 1))[:, 0]
    s = timesteps.gather(1, (at + 1).clamp(max=timesteps.shape[1] - 1))[:, 0]
    dream = torch.where(last, num_candidates, (num_candidates.float() * (1 - s / t)).to(torch.int64))
    count = torch.zeros_like(num_candidates)
    count = torch.where(kind == COUNT_TABLE, llada, count)
    count = torch.where(kind == COUNT_SPREAD, spread, count)
    count = torch.where(kind == COUNT_DREAM, dream, count)
    if coins is not None:
        count = torch.where(kind == COUNT_COINS, coins, count)
    if fraction is not None:
        part = (num_candidates.double() * fraction.double()).floor().to(num_candidates.dtype).clamp(min=1)
        count = torch.where(kind == COUNT_FRACTION, torch.minimum(part, num_candidates), count)
    return torch.where(kind == COUNT_NONE, 0, count).clamp(min=0)


def origin_probability(block_step: torch.Tensor, steps_per_block: torch.Tensor,
                       timesteps: torch.Tensor) -> torch.Tensor:
    """Dream's ``origin`` coin per request: each masked position is unmasked with probability ``1 - s / t`` (fp32),
    1 at the last step."""
    at = block_step[:, None]
    t = timesteps.gather(1, at.clamp(max=timesteps.shape[1] - 1))[:, 0]
    s = timesteps.gather(1, (at + 1).clamp(max=timesteps.shape[1] - 1))[:, 0]
    return torch.where(block_step >= steps_per_block - 1, 1.0, 1 - s / t)
