"""The token layout that tells attention which tokens see which (:class:`TokenLayout`).

A leaf module: it imports nothing from the package (torch only for type hints), so that ``ops``, ``native`` and
``models`` can all use it without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class LayerAttention(Protocol):
    """What a layout's ``kv`` is: attention of one layer over the forward's fresh tokens and whatever else it plans
    (``engine.attention_plan.AttentionPlan``: the paged KV cache, masks, kernel arguments). q ``[N, H, D]`` and k
    ``[N, KV, D]`` come before RoPE; ``rope`` (``models.layers.Rotary``) holds the forward's rotary tables."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: object) -> torch.Tensor:
        ...


@dataclass(slots=True)
class TokenLayout:
    """How the flat token axis is cut into independent sequences.

    Exactly one form is set:
    - padded: ``batch`` rows of ``seq_len`` tokens each, ``key_mask`` ``[batch, seq_len]`` (True = real token)
      or None when nothing is padded;
    - packed: ``cu_seqlens`` (cumulative lengths, ``len = num_sequences + 1``) of concatenated sequences.
    Attention is bidirectional within a sequence, or block-causal with ``block_size`` (a token in block j of its
    sequence, counted from the sequence's first token, sees the tokens of blocks <= j).
    ``kv``: an attention plan (:class:`LayerAttention`, e.g. ``engine.attention_plan.AttentionPlan``) that takes
    over attention: it reads cached keys and values, writes fresh ones, and knows which
    tokens see which (see :func:`models.layers.attend`). ``cu_seqlens_device``: ``cu_seqlens`` as an int32 tensor on
    the model's device, made once per forward by whoever builds the layout (else each attention call uploads it).
    """

    batch: int = 0
    seq_len: int = 0
    key_mask: torch.Tensor | None = None
    cu_seqlens: list[int] | None = None
    block_size: int | None = None
    kv: LayerAttention | None = None
    cu_seqlens_device: torch.Tensor | None = None

    @classmethod
    def padded(cls, batch: int, seq_len: int, key_mask: torch.Tensor | None = None) -> TokenLayout:
        return cls(batch=batch, seq_len=seq_len, key_mask=key_mask)

    @classmethod
    def packed(cls, seqlens: list[int], block_size: int | None = None,
               kv: LayerAttention | None = None) -> TokenLayout:
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + int(n))
        return cls(cu_seqlens=cu, block_size=block_size, kv=kv)

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1] if self.cu_seqlens is not None else self.batch * self.seq_len
