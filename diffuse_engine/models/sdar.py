"""SDAR: block diffusion on the Qwen3 layout, with the parameter names of JetLM/SDAR-*-Chat
(``modeling_sdar.py``): ``model.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm}`` and ``lm_head`` (absent when the
embeddings are tied).

Differences from Dream: every head of q and k is RMS-normalised over ``head_dim`` (``q_norm`` / ``k_norm``) before
RoPE; the head dim is explicit (``ModelConfig.explicit_head_dim``) and need not be ``hidden_size // num_heads``;
projection biases exist only with Qwen3's ``attention_bias`` (then on q, k, v and o); logits are not shifted (the
prediction for position i is row i); and attention is block-causal over blocks of ``ModelConfig.block_size``
tokens, which the layout carries (:class:`~diffuse_engine.models.layers.TokenLayout`'s ``block_size``, set by
:meth:`DiffusionLM.forward`, or a KV-cache plan).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .base import DiffusionLM
from .layers import RMSNorm, TokenLayout, apply_rope, attend, swiglu


class _Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=c.qkv_bias)  # Qwen3's attention_bias covers o_proj too
        self.q_norm = RMSNorm(hd, c.rms_norm_eps)
        self.k_norm = RMSNorm(hd, c.rms_norm_eps)


class _MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class SDARLayer(nn.Module):
    """One decoder layer: pre-norm attention (q/k RMSNorm per head, then RoPE) and a pre-norm SwiGLU MLP."""

    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        n, at, mlp = h.shape[0], self.self_attn, self.mlp
        x = self.input_layernorm(h)
        q = ops.linear(x, at.q_proj.weight, at.q_proj.bias).view(n, self.n_heads, self.head_dim)
        k = ops.linear(x, at.k_proj.weight, at.k_proj.bias).view(n, self.n_kv, self.head_dim)
        v = ops.linear(x, at.v_proj.weight, at.v_proj.bias).view(n, self.n_kv, self.head_dim)
        q = apply_rope(at.q_norm(q), cos, sin, full_precision=False)
        k = apply_rope(at.k_norm(k), cos, sin, full_precision=False)
        a = attend(q, k, v, layout, self.layer).reshape(n, -1)
        h = h + ops.linear(a, at.o_proj.weight, at.o_proj.bias)
        x = self.post_attention_layernorm(h)
        g = swiglu(ops.linear(x, mlp.gate_proj.weight), ops.linear(x, mlp.up_proj.weight))
        return h + ops.linear(g, mlp.down_proj.weight)


class _Model(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(SDARLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class SDARModel(DiffusionLM):
    """An SDAR checkpoint (``model_type: "sdar"``). Its config must have ``arch == "sdar"``."""

    def __init__(self, config: ModelConfig) -> None:
        if config.arch != "sdar":
            raise ValueError(f"SDARModel needs a config with arch 'sdar', got {config.arch!r}.")
        super().__init__(config)
        self.model = _Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
