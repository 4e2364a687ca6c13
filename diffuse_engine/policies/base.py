"""The two policy protocols of a denoising step, and what they exchange with the engine.

A step scores every candidate (still-masked position of the current block), then:
1. the request's :class:`RevisionPolicy` (if any) may re-mask or replace tokens committed earlier in the block;
2. its :class:`DecodingPolicy` gives the :class:`CommitRule` that decides how many of the ranked candidates
   are committed; one :func:`diffuse_engine.ops.commit` call applies the rules of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..kernels.reference import COMMIT_ENTROPY, COMMIT_FACTOR, COMMIT_THRESHOLD, COMMIT_TOPK

if TYPE_CHECKING:
    from ..engine.request import Request
    from ..engine.runner import Verification

__all__ = ["COMMIT_ENTROPY", "COMMIT_FACTOR", "COMMIT_THRESHOLD", "COMMIT_TOPK", "CommitRule", "DecodingPolicy",
           "Revision", "RevisionPolicy", "steps_left"]


@dataclass(slots=True, frozen=True)
class CommitRule:
    """One request's rule for this step, in the terms of :func:`diffuse_engine.ops.commit`: ``mode`` is one of
    COMMIT_TOPK (``count``), COMMIT_THRESHOLD (``threshold``), COMMIT_FACTOR (``factor``), COMMIT_ENTROPY
    (``eb_gamma``)."""

    mode: int
    count: int = 0
    threshold: float = 0.0
    factor: float = 0.0
    eb_gamma: float = 0.0


class DecodingPolicy(Protocol):
    """How many ranked candidates a step commits, and when a block is finished."""

    name: str
    adaptive: bool  # the number of steps per block depends on the model's confidence

    def rule(self, req: Request, num_candidates: int) -> CommitRule:
        """The commit rule of ``req``'s current step, which has ``num_candidates`` candidates."""
        ...

    def block_done(self, req: Request) -> bool:
        """Whether ``req``'s current block is finished after the step just taken."""
        ...


@dataclass(slots=True)
class Revision:
    """What a revision policy does to one request in one step: ``remask`` positions go back to [MASK];
    ``replace`` maps positions to new tokens."""

    remask: list[int]
    replace: dict[int, int]


class RevisionPolicy(Protocol):
    """Revises tokens committed earlier in the current block."""

    name: str
    verifies: bool  # needs leave-one-out scores of the committed tokens (an extra query per token)

    def revise(self, req: Request, committed: torch.Tensor, verify: Verification | None, index: int) -> Revision:
        """``committed``: the sequence positions of the block's committed tokens; ``verify``: the step's
        leave-one-out scores (request ``index`` owns ``verify.starts[index]:verify.starts[index + 1]``)."""
        ...


def steps_left(req: Request) -> int:
    """Steps left in the block including this one (the fixed schedule); at least 1."""
    return max(1, req.params.steps_per_block - req.block_step)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b > 0 else a


def uniform_sigma(alpha_t: float, alpha_s: float) -> float:
    """ReMDM's largest re-masking probability, min(1, (1 - alpha_s) / alpha_t), for unmasked fractions alpha_t
    now and alpha_s after the step."""
    if alpha_t <= 0:
        return 0.0
    return min(1.0, max(0.0, (1.0 - alpha_s) / alpha_t))


