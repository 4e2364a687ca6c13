"""LLaDA: a bidirectional Llama with the parameter names of GSAI-ML/LLaDA-8B-Instruct (``modeling_llada.py``):
``model.transformer.{wte, blocks.N.{q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out, attn_norm,
ff_norm}, ln_f, ff_out}``. ``ff_proj`` is the SwiGLU gate, ``up_proj`` the linear branch."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .base import DiffusionLM
from .layers import RMSNorm, Rotary, TokenLayout, attend, row_linear, swiglu


class LLaDABlock(nn.Module):
    tp = None  # tensor-parallel context of a sharded block (see DiffusionLM.tp)

    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        d, hd = c.hidden_size, c.head_dim
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, hd
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=c.qkv_bias)
        self.attn_out = nn.Linear(c.num_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.ff_out = nn.Linear(c.intermediate_size, d, bias=False)
        self.attn_norm = RMSNorm(d, c.rms_norm_eps)
        self.ff_norm = RMSNorm(d, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, rope: Rotary, layout: TokenLayout) -> torch.Tensor:
        n = h.shape[0]
        x = self.attn_norm(h)
        q = ops.linear(x, self.q_proj.weight, self.q_proj.bias).view(n, self.n_heads, self.head_dim)
        k = ops.linear(x, self.k_proj.weight, self.k_proj.bias).view(n, self.n_kv, self.head_dim)
        v = ops.linear(x, self.v_proj.weight, self.v_proj.bias).view(n, self.n_kv, self.head_dim)
        a = attend(q, k, v, layout, self.layer, rope).reshape(n, -1)
        h = h + row_linear(a, self.attn_out.weight, None, self.tp)
        x = self.ff_norm(h)
        g = swiglu(ops.linear(x, self.ff_proj.weight), ops.linear(x, self.up_proj.weight))
        return h + row_linear(g, self.ff_out.weight, None, self.tp)


class _Transformer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(LLaDABlock(c, i) for i in range(c.num_layers))
        self.ln_f = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.ff_out = nn.Linear(c.hidden_size, c.vocab_size, bias=False)


class _Model(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.transformer = _Transformer(c)


class LLaDAModelLM(DiffusionLM):
    rope_full_precision = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = _Model(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.wte(input_ids)

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.ln_f(h)

    def lm_head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t.wte.weight if self.config.tie_word_embeddings else t.ff_out.weight
