"""Building blocks shared by the model families: RMSNorm, rotary embeddings, SwiGLU, and attention over the token
layout (:class:`TokenLayout`, defined in :mod:`diffuse_engine.layout` and re-exported here).

Hidden states are always flat ``[num_tokens, hidden]``: a padded ``[batch, seq]`` input is flattened, a
packed batch of variable-length sequences is concatenated. Every matmul goes through :func:`ops.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..layout import TokenLayout


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
    q = apply_rope(q, rope.cos, rope.sin, rope.full_precision)
    k = apply_rope(k, rope.cos, rope.sin, rope.full_precision)
    return ops.attention(q, k, v, layout, block_size=layout.block_size)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32,
                 rotary_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[num_tokens, head_dim]`` for the halves convention (``rotate_half``).

    With a ``rotary_dim`` below ``head_dim`` (partial RoPE), the frequencies are those of a ``rotary_dim``-wide
    rotation and the other pairs get angle 0 (cos 1, sin 0): heads laid out by :func:`rotary_permutation` then
    rotate exactly their first ``rotary_dim`` dims, as the published partial-RoPE models do."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    rot = head_dim if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, device=positions.device, dtype=work) / rot))
    if rot < head_dim:
        inv_freq = torch.cat([inv_freq, inv_freq.new_zeros((head_dim - rot) // 2)])
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotary_permutation(head_dim: int, rotary_dim: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The order of head dims under which partial RoPE (``rotate_half`` over the first ``rotary_dim`` dims, the
    rest untouched) is the whole-head ``rotate_half`` of :func:`apply_rope` with :func:`rope_cos_sin`'s tables:
    ``[r0 | p0 | r1 | p1]`` for rotary halves r0, r1 and pass-through halves p0, p1. q and k take the same
    permutation, so their dot products (all that attention reads of them) do not change. None when RoPE covers the
    whole head."""
    if rotary_dim >= head_dim:
        return None
    half, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
    idx = torch.arange(head_dim, device=device)
    return torch.cat([idx[:half], idx[rotary_dim:rotary_dim + rest], idx[half:rotary_dim], idx[rotary_dim + rest:]])


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


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp) -> torch.Tensor:
    """A row-parallel projection: ``x @ weight.T`` summed over the tensor-parallel ranks (each holds a slice of the
    input features), then the bias once. On one device (``tp`` None) it is ``ops.linear(x, weight, bias)``."""
    if tp is None:
        return ops.linear(x, weight, bias)
    y = tp.all_reduce(ops.linear(x, weight))
    return y if bias is None else y + bias


def sum_over_ranks(x: torch.Tensor, tp) -> torch.Tensor:
    """The sum of every tensor-parallel rank's partial ``x`` (one all-reduce); ``x`` itself on one device (``tp``
    None). A mixture-of-experts layer adds its routed and shared partial outputs before this one reduce."""
    return x if tp is None else tp.all_reduce(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def init_linear_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Random init with unit-scale activations (std 1/sqrt(fan_in)), so that random test models produce
    decisive (non-uniform) predictions."""
    fan_in = weight.shape[1]
    with torch.no_grad():
        weight.normal_(0.0, fan_in ** -0.5, generator=generator)
