"""Building blocks shared by the model families: RMSNorm, rotary embeddings, SwiGLU, and the token layout
(:class:`TokenLayout`) that tells attention which tokens see which.

Hidden states are always flat ``[num_tokens, hidden]``: a padded ``[batch, seq]`` input is flattened, a
packed batch of variable-length sequences is concatenated. Every matmul goes through :func:`ops.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, normalised in fp32 and cast back (LLaDA and Qwen2 agree)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


@dataclass(slots=True)
class TokenLayout:
    """How the flat token axis is cut into independent sequences.

    Exactly one form is set:
    - padded: ``batch`` rows of ``seq_len`` tokens each, ``key_mask`` ``[batch, seq_len]`` (True = real token)
      or None when nothing is padded;
    - packed: ``cu_seqlens`` (cumulative lengths, ``len = num_sequences + 1``) of concatenated sequences.
    Attention is bidirectional within a sequence, or block-causal with ``block_size`` (a token in block j of its
    sequence, counted from the sequence's first token, sees the tokens of blocks <= j).
    ``kv``: an attention plan (``engine.attention_plan.AttentionPlan``, any object with its ``attend(layer, q, k,
    v, rope)``) that takes over attention: it reads cached keys and values, writes fresh ones, and knows which
    tokens see which (see :func:`attend`). ``cu_seqlens_device``: ``cu_seqlens`` as an int32 tensor on the
    model's device, made once per forward by whoever builds the layout (else each attention call uploads it).
    """

    batch: int = 0
    seq_len: int = 0
    key_mask: torch.Tensor | None = None
    cu_seqlens: list[int] | None = None
    block_size: int | None = None
    kv: object | None = None
    cu_seqlens_device: torch.Tensor | None = None

    @classmethod
    def padded(cls, batch: int, seq_len: int, key_mask: torch.Tensor | None = None) -> TokenLayout:
        return cls(batch=batch, seq_len=seq_len, key_mask=key_mask)

    @classmethod
    def packed(cls, seqlens: list[int], block_size: int | None = None, kv: object | None = None) -> TokenLayout:
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + int(n))
        return cls(cu_seqlens=cu, block_size=block_size, kv=kv)

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1] if self.cu_seqlens is not None else self.batch * self.seq_len


@dataclass(slots=True)
class Rotary:
    """The rotary tables of one forward: ``cos`` / ``sin`` ``[num_tokens, head_dim]`` (fp32, fp64 for fp64 models)
    and whether q and k rotate in fp32 (``full_precision``, LLaDA) or in their own dtype (Qwen2 / Dream)."""

    cos: torch.Tensor
    sin: torch.Tensor
    full_precision: bool


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, layer: int,
           rope: Rotary) -> torch.Tensor:
    """Attention of layer ``layer``: q ``[N, H, D]``, k / v ``[N, KV, D]``, q and k before RoPE. Through the
    layout's attention plan when it has one (which rotates where it attends: in the cached-block kernel, or in
    torch for SDPA and the cache), else RoPE here and :func:`ops.attention` within each sequence."""
    if layout.kv is not None:
        return layout.kv.attend(layer, q, k, v, rope)
    from .. import ops

    q = apply_rope(q, rope.cos, rope.sin, rope.full_precision)
    k = apply_rope(k, rope.cos, rope.sin, rope.full_precision)
    return ops.attention(q, k, v, layout, block_size=layout.block_size)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[num_tokens, head_dim]`` for the halves convention (``rotate_half``)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """Rotate ``x`` ``[num_tokens, heads, head_dim]``. ``full_precision`` rotates in fp32 (LLaDA's
    ``rope_full_precision``); otherwise the tables are cast to x's dtype (Qwen2 / Dream)."""
    dtype = x.dtype
    if full_precision and dtype not in (torch.float32, torch.float64):
        x = x.float()
    c = cos[:, None, :].to(x.dtype)
    s = sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * c + rotated * s).to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def init_linear_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Random init with unit-scale activations (std 1/sqrt(fan_in)), so that random test models produce
    decisive (non-uniform) predictions."""
    fan_in = weight.shape[1]
    with torch.no_grad():
        weight.normal_(0.0, fan_in ** -0.5, generator=generator)
