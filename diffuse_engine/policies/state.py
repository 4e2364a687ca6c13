"""What a decoding or revision policy reads of a request: its settings and the state of its current block.

The engine fills a :class:`BlockState` from its request (:func:`block_state` reads the request's public fields by
name), so the policies depend on plain numbers and :class:`~diffuse_engine.sampling_params.SamplingParams`, not on
the engine. Plain standard library (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BlockState", "BlockSource", "block_state"]


@dataclass(frozen=True, slots=True)
class BlockState:
    """One request's current block after its last step. ``params``: its settings; ``arch``: the model family
    (``ModelConfig.arch``); ``ordering``: its resolved confidence ordering; ``block_step``: steps taken in the
    block; ``block_len``: the block's positions; ``masked``: those still masked; ``block_diffusion``: the model
    decodes in fixed blocks with an exact cache of finished ones (SDAR)."""

    params: Any  # the request's SamplingParams (sampling_params.py builds on the policies: not imported here)
    arch: str
    ordering: str
    block_step: int
    block_len: int
    masked: int
    block_diffusion: bool = False


class BlockSource(Protocol):
    """The fields of the engine's request that :func:`block_state` reads."""

    params: Any
    arch: str
    remasking: str
    block_step: int
    block_masked_count: int
    block_size: int | None

    @property
    def block_span(self) -> tuple[int, int]: ...


def block_state(req: BlockState | BlockSource) -> BlockState:
    """``req``'s :class:`BlockState` (``req`` itself when it is one)."""
    if isinstance(req, BlockState):
        return req
    start, end = req.block_span
    return BlockState(req.params, req.arch, req.remasking, req.block_step, end - start, req.block_masked_count,
                      req.block_size is not None)
