"""Dream: the Qwen2.5 layout (GQA, q/k/v biases) with the parameter names of Dream-org/Dream-v0-Instruct-7B:
``model.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
post_attention_layernorm}, norm}`` and ``lm_head``. Its logits are shifted: the engine reads the prediction
for position i from row i - 1 (``ModelConfig.shifted_logits``)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .base import DiffusionLM
from .layers import RMSNorm, Rotary, TokenLayout, attend, row_linear, swiglu


class _Attention(nn.Module):
    """Qwen2 attention projections; Qwen3 (``config.qk_norm``, SDAR) adds a per-head RMSNorm of q and k and puts
    its ``attention_bias`` on o_proj too."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=c.qkv_bias and c.qk_norm)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps)


class _MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class DreamLayer(nn.Module):
    tp = None  # tensor-parallel context of a sharded layer (see DiffusionLM.tp)

    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qk_norm = c.qk_norm
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, rope: Rotary, layout: TokenLayout) -> torch.Tensor:
        n, at, mlp = h.shape[0], self.self_attn, self.mlp
        x = self.input_layernorm(h)
        q = ops.linear(x, at.q_proj.weight, at.q_proj.bias).view(n, self.n_heads, self.head_dim)
        k = ops.linear(x, at.k_proj.weight, at.k_proj.bias).view(n, self.n_kv, self.head_dim)
        v = ops.linear(x, at.v_proj.weight, at.v_proj.bias).view(n, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = at.q_norm(q), at.k_norm(k)
        h = h + row_linear(attend(q, k, v, layout, self.layer, rope).reshape(n, -1), at.o_proj.weight,
                           at.o_proj.bias, self.tp)
        x = self.post_attention_layernorm(h)
        g = swiglu(ops.linear(x, mlp.gate_proj.weight), ops.linear(x, mlp.up_proj.weight))
        return h + row_linear(g, mlp.down_proj.weight, None, self.tp)


class _Model(nn.Module):
    def __init__(self, c: ModelConfig, layer: type[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(layer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DreamModel(DiffusionLM):
    """The Qwen-style wrapper ``model.{embed_tokens, layers, norm}`` + ``lm_head``; subclasses that keep it (SDAR,
    LLaDA-MoE) set :attr:`LAYER`, the decoder layer class."""

    LAYER: type[nn.Module] = DreamLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = _Model(config, self.LAYER)
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
