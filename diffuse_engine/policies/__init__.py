"""Decoding and revision policies, registered explicitly by the names ``SamplingParams`` uses.

Decoding (``SamplingParams.policy``): ``fixed``, ``threshold``, ``factor``, ``eb``.
Revision (``SamplingParams.revision``): ``remdm``, ``wino``, ``edit``.
"""

from __future__ import annotations

from .base import CommitRule, DecodingPolicy, Revision, RevisionContext, RevisionPolicy
from .eb import EntropyBounded
from .edit import Edit
from .factor import Factor
from .fixed import FixedSteps
from .remdm import ReMDM
from .threshold import Threshold
from .wino import Wino

DECODING: dict[str, DecodingPolicy] = {}
REVISION: dict[str, RevisionPolicy] = {}


def register_decoding(policy: DecodingPolicy) -> None:
    DECODING[policy.name] = policy


def register_revision(policy: RevisionPolicy) -> None:
    REVISION[policy.name] = policy


for _policy in (FixedSteps(), Threshold(), Factor(), EntropyBounded()):
    register_decoding(_policy)
for _revision in (ReMDM(), Wino(), Edit()):
    register_revision(_revision)


def decoding_policy(req) -> DecodingPolicy:
    return DECODING[req.params.policy]


def revision_policy(req) -> RevisionPolicy | None:
    """The request's revision policy while it may act in the current step, else None: it stops at the
    block's last scheduled step (fixed policy) or after ``block_length`` steps (adaptive), so blocks finish."""
    name = req.params.revision
    if name is None:
        return None
    start, end = req.block_span
    limit = req.params.steps_per_block - 1 if not req.params.adaptive else end - start
    return REVISION[name] if req.block_step < limit else None


__all__ = ["DECODING", "REVISION", "CommitRule", "DecodingPolicy", "Revision", "RevisionContext", "RevisionPolicy",
           "decoding_policy", "register_decoding", "register_revision", "revision_policy"]
