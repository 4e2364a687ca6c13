"""Fixed steps: the model family's published schedule (LLaDA's per-step counts, Dream's timesteps)."""

from __future__ import annotations

from .base import COMMIT_TOPK, CommitRule, ceil_div, steps_left


class FixedSteps:
    name = "fixed"
    adaptive = False

    def rule(self, req, num_candidates: int) -> CommitRule:
        if req.arch == "dream":
            from ..engine.schedule import dream_transfer_count

            count = dream_transfer_count(num_candidates, req.block_step, req.timesteps)
        elif req.params.revision is not None:
            # Revised tokens come back as candidates: spread what is masked over the steps left (equal to
            # LLaDA's counts while nothing has been re-masked).
            count = ceil_div(num_candidates, steps_left(req))
        else:
            count = req.block_counts[req.block_step]
        return CommitRule(COMMIT_TOPK, count=count)

    def block_done(self, req) -> bool:
        # A block-diffusion model's block ends when nothing is left to commit (SDAR's loop; its first block,
        # which starts inside the prompt, can run out early). LLaDA and Dream run every scheduled step, as
        # published (Dream's ``origin`` coins can empty a block early; the NFE stays that of the reference).
        return req.block_step >= req.params.steps_per_block or (req.block_size is not None
                                                                and req.block_masked() == 0)
