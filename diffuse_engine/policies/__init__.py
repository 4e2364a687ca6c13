"""Decoding and revision policies and confidence orderings, registered explicitly by the names ``SamplingParams``
accepts: the registries are the one list of names.

Orderings (``SamplingParams.remasking``, :mod:`.ordering`): ``low_confidence``, ``random``, ``origin``,
``maskgit_plus``, ``topk_margin``, ``entropy``.
Decoding (``SamplingParams.policy``): ``fixed``, ``threshold``, ``factor``, ``eb``.
Revision (``SamplingParams.revision``): ``remdm``, ``wino``, ``edit``.

Importing this package is light (no torch): the built-in policies are loaded the first time one is looked up, and
the protocol types of :mod:`.base` when first named. A policy reads a :class:`BlockState`, never the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .ordering import (
    ORDERINGS,
    Ordering,
    default_ordering,
    head_statistics,
    ordering_flags,
    register_ordering,
    unregister_ordering,
)
from .registry import Names, Registry
from .state import BlockState, block_state

if TYPE_CHECKING:
    from .base import CommitRule, DecodingPolicy, RevisionPolicy

DECODING: Registry[DecodingPolicy] = Registry("decoding policy")
REVISION: Registry[RevisionPolicy] = Registry("revision policy")


def _builtin(module: str, cls: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


for _name, _module, _cls in (("fixed", "fixed", "FixedSteps"), ("threshold", "threshold", "Threshold"),
                             ("factor", "factor", "Factor"), ("eb", "eb", "EntropyBounded")):
    DECODING.register_lazy(_name, _builtin(_module, _cls))
for _name, _module, _cls in (("remdm", "remdm", "ReMDM"), ("wino", "wino", "Wino"), ("edit", "edit", "Edit")):
    REVISION.register_lazy(_name, _builtin(_module, _cls))


def register_decoding(policy: DecodingPolicy) -> None:
    """Make ``policy`` selectable as ``SamplingParams(policy=policy.name)``."""
    DECODING.register(policy.name, policy)


def unregister_decoding(name: str) -> None:
    DECODING.unregister(name)


def register_revision(policy: RevisionPolicy) -> None:
    """Make ``policy`` selectable as ``SamplingParams(revision=policy.name)``."""
    REVISION.register(policy.name, policy)


def unregister_revision(name: str) -> None:
    REVISION.unregister(name)


class _Bound:
    """A decoding policy as the engine calls it: with its request, read into a :class:`BlockState` first."""

    __slots__ = ("policy",)

    def __init__(self, policy: DecodingPolicy) -> None:
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def rule(self, req) -> CommitRule:
        return self.policy.rule(block_state(req))

    def block_done(self, req) -> bool:
        return self.policy.block_done(block_state(req))


def decoding_policy(req) -> DecodingPolicy:
    """The decoding policy of ``req`` (a :class:`BlockState`, or the engine's request, read into one)."""
    return _Bound(DECODING[req.params.policy])  # both carry the request's params


def revision_policy(req) -> RevisionPolicy | None:
    """The revision policy of ``req`` (as :func:`decoding_policy`) while it may act in the current step, else None:
    it stops at the block's last scheduled step (fixed policy) or after ``block_length`` steps (adaptive), so
    blocks finish."""
    state = block_state(req)
    name = state.params.revision
    if name is None:
        return None
    limit = state.params.steps_per_block - 1 if not state.params.adaptive else state.block_len
    return REVISION[name] if state.block_step < limit else None


def score_statistics(orderings: Sequence[str], policies: Sequence[str]) -> set[str]:
    """The extra statistics of the head (keys of ops.row_stats) that a batch with these orderings and decoding
    policies reads."""
    return head_statistics(orderings) | {s for name in set(policies) for s in DECODING[name].needs}


_BASE = ("COMMIT_ENTROPY", "COMMIT_FACTOR", "COMMIT_THRESHOLD", "COMMIT_TOPK", "COUNT_COINS", "COUNT_DREAM",
         "COUNT_FRACTION", "COUNT_NONE", "COUNT_SPREAD", "COUNT_TABLE", "CommitRule", "DecodingPolicy", "Revision",
         "RevisionContext", "RevisionPolicy")


def __getattr__(name: str) -> Any:
    if name in _BASE:  # the protocol types import torch: load them when first named
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DECODING", "ORDERINGS", "REVISION", "BlockState", "Names", "Ordering", "Registry", *_BASE, "block_state",
           "decoding_policy", "default_ordering", "ordering_flags", "register_decoding", "register_ordering",
           "register_revision", "revision_policy", "score_statistics", "unregister_decoding", "unregister_ordering",
           "unregister_revision"]
