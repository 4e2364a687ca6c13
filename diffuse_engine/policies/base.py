"""The two policy protocols of a denoising step, and what they exchange with the engine.

A step scores every candidate (still-masked position of the current block), then:
1. the request's :class:`RevisionPolicy` (if any) may re-mask or replace tokens committed earlier in the block;
2. its :class:`DecodingPolicy` gives the :class:`CommitRule` that decides how many of the ranked candidates
   are committed; one :func:`diffuse_engine.ops.commit` call applies the rules of the whole batch.

Both run on the device for a whole batch at once: a rule is fixed for a request's block (its count, when it has
one, is computed each step on the device: :mod:`.fixed`), and a revision policy maps the batch's
:class:`RevisionContext` (padded ``[B, W]`` matrices of the requests' windows) to a :class:`Revision` of the same
shape; the engine applies it to the rows of the requests that use that policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..kernels.reference import COMMIT_ENTROPY, COMMIT_FACTOR, COMMIT_THRESHOLD, COMMIT_TOPK
from .state import BlockState

__all__ = ["COMMIT_ENTROPY", "COMMIT_FACTOR", "COMMIT_THRESHOLD", "COMMIT_TOPK", "COUNT_COINS", "COUNT_DREAM",
           "COUNT_FRACTION", "COUNT_NONE", "COUNT_SPREAD", "COUNT_TABLE", "BlockState", "CommitRule",
           "DecodingPolicy", "Revision", "RevisionContext", "RevisionPolicy"]

# How a step's count is computed on the device (see policies/fixed.py); COUNT_NONE: the rule needs none.
COUNT_TABLE, COUNT_SPREAD, COUNT_DREAM, COUNT_COINS, COUNT_NONE, COUNT_FRACTION = 0, 1, 2, 3, 4, 5


@dataclass(slots=True, frozen=True)
class CommitRule:
    """One request's rule for its block, in the terms of :func:`diffuse_engine.ops.commit`: ``mode`` is one of
    COMMIT_TOPK (a count of kind ``count_kind``, computed each step), COMMIT_THRESHOLD (``threshold``),
    COMMIT_FACTOR (``factor``), COMMIT_ENTROPY (``eb_gamma``). A count of kind COUNT_FRACTION is ``factor`` times
    the candidates (rounded down, at least one)."""

    mode: int
    count_kind: int = COUNT_NONE
    threshold: float = 0.0
    factor: float = 0.0
    eb_gamma: float = 0.0


class DecodingPolicy(Protocol):
    """How many ranked candidates a step commits, and when a block is finished."""

    name: str
    adaptive: bool  # the number of steps per block depends on the model's confidence
    needs: tuple[str, ...]  # extra statistics of the head the rule reads (keys of ops.row_stats: "neg_entropy")

    def rule(self, state: BlockState) -> CommitRule:
        """The commit rule of the block's next step."""
        ...

    def block_done(self, state: BlockState) -> bool:
        """Whether the block is finished after the step just taken (``state.block_step`` steps taken,
        ``state.masked`` positions of the block still masked)."""
        ...


@dataclass(slots=True)
class RevisionContext:
    """What a revision policy sees, for a batch of B requests (row b: request b's window, W columns; device
    tensors). ``committed`` / ``masked``: the block's committed / masked cells before the step; ``current``: their
    tokens; ``conf``: each committed cell's confidence when it was committed; ``seed``, ``step``, ``position``:
    the noise keys of every cell. Per request ``[B]``: ``block_len``, ``block_step``, ``steps_per_block``,
    ``adaptive`` and the parameters ``remdm_variant`` (0 cap, 1 rescale, 2 conf), ``remdm_eta`` (fp64),
    ``verify_threshold``, ``edit_margin``. With a verifying policy in the batch: ``p_current`` (probability of the
    current token with its position hidden), ``top_token`` and ``top_prob`` (the most probable token there).
    ``mask_id``: the [MASK] id; ``conf_variant``: whether any request uses ReMDM's ``conf`` variant."""

    committed: torch.Tensor
    masked: torch.Tensor
    current: torch.Tensor
    conf: torch.Tensor | None
    seed: torch.Tensor
    step: torch.Tensor
    position: torch.Tensor
    block_len: torch.Tensor
    block_step: torch.Tensor
    steps_per_block: torch.Tensor
    adaptive: torch.Tensor
    remdm_variant: torch.Tensor
    remdm_eta: torch.Tensor
    verify_threshold: torch.Tensor
    edit_margin: torch.Tensor
    p_current: torch.Tensor | None
    top_token: torch.Tensor | None
    top_prob: torch.Tensor | None
    mask_id: int
    conf_variant: bool = False


@dataclass(slots=True)
class Revision:
    """What a revision policy does to a batch's cells in one step: ``remask`` ``[B, W]`` cells go back to [MASK];
    where ``replace`` ``[B, W]`` (None: nowhere) is set, the token becomes ``replace_token``."""

    remask: torch.Tensor
    replace: torch.Tensor | None = None
    replace_token: torch.Tensor | None = None


class RevisionPolicy(Protocol):
    """Revises tokens committed earlier in the current block."""

    name: str
    verifies: bool  # needs leave-one-out scores of the committed tokens (an extra query per block position)

    def revise(self, ctx: RevisionContext) -> Revision:
        """The revision of every row of ``ctx`` as if each request used this policy (the engine keeps the rows
        of the requests that do)."""
        ...


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b > 0 else a
