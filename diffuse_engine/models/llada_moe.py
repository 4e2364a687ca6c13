"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*, ``architectures: ["LLaDAMoEModelLM"]``): a bidirectional OLMoE-style
mixture-of-experts model, with the parameter names of its ``modeling_lladamoe.py``: ``model.{embed_tokens,
layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.*, shared_expert.*, input_layernorm,
post_attention_layernorm}, norm}`` and ``lm_head``. Dense layers (``moe_layer_freq`` 0) have a SwiGLU
``mlp.{gate,up,down}_proj``; MoE layers ``mlp.gate.weight`` (router), ``mlp.expert_bias`` (when the config enables
it), ``mlp.experts.{j}.{gate,up,down}_proj`` (stacked here into ``mlp.experts.{gate,up,down}_proj``) and, with a
``shared_expert_intermediate_size``, ``shared_expert.{gate,up,down}_proj`` beside the mlp.

Attention: separate q/k/v/o projections, per-head RMSNorm of q and k before RoPE (``partial_rotary_factor`` of each
head), full bidirectional attention. Router: logits in the model dtype, softmax in fp32, plus ``expert_bias`` when
present, top-k of that; the picked values are the weights (not renormalised, not scaled). Logits are not shifted.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .dream import DreamModel
from .layers import RMSNorm, Rotary, TokenLayout, row_linear, sum_over_ranks
from .llada2 import HeadPermutation, norm_rope_attend
from .moe import Router, RouterSpec, StackedExperts, SwiGLU


class _Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, c.rms_norm_eps)
        self.k_norm = RMSNorm(hd, c.rms_norm_eps)


class LLaDAMoESparseMoe(nn.Module):
    """Router (``gate``), optional ``expert_bias`` and the routed experts of one MoE layer."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        spec = RouterSpec(top_k=c.num_experts_per_tok, score="softmax", bias_weighs=True)
        self.gate = Router(c.hidden_size, c.num_experts, spec, own_bias=False, fp32=False)
        self.experts = StackedExperts(c.num_experts, c.hidden_size, c.moe_intermediate_size)
        if c.expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(c.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x, getattr(self, "expert_bias", None))
        return self.experts(x, ids, weights)


class LLaDAMoELayer(nn.Module):
    tp = None  # tensor-parallel context of a sharded layer (see DiffusionLM.tp)

    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.self_attn = _Attention(c)
        moe = c.is_moe_layer(layer)
        self.mlp = LLaDAMoESparseMoe(c) if moe else SwiGLU(c.hidden_size, c.intermediate_size)
        if moe and c.num_shared_experts:
            self.shared_expert = SwiGLU(c.hidden_size, c.num_shared_experts * c.moe_intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.perm = HeadPermutation(c.head_dim, c.rotary_dim)

    def forward(self, h: torch.Tensor, rope: Rotary, layout: TokenLayout) -> torch.Tensor:
        n, at = h.shape[0], self.self_attn
        x = self.input_layernorm(h)
        q = ops.linear(x, at.q_proj.weight).view(n, self.n_heads, self.head_dim)
        k = ops.linear(x, at.k_proj.weight).view(n, self.n_kv, self.head_dim)
        v = ops.linear(x, at.v_proj.weight).view(n, self.n_kv, self.head_dim)
        a = norm_rope_attend(q, k, v, (at.q_norm, at.k_norm), self.perm, layout, self.layer, rope)
        h = h + row_linear(a, at.o_proj.weight, None, self.tp)
        x = self.post_attention_layernorm(h)
        out = self.mlp(x)
        shared = getattr(self, "shared_expert", None)
        return h + sum_over_ranks(out if shared is None else out + shared(x), self.tp)


class LLaDAMoEModelLM(DreamModel):
    """A LLaDA-MoE checkpoint (the Qwen-style wrapper of :class:`~.dream.DreamModel` around
    :class:`LLaDAMoELayer`). Its config must have ``arch == "llada_moe"``."""

    LAYER = LLaDAMoELayer

    def __init__(self, config: ModelConfig) -> None:
        if config.arch != "llada_moe":
            raise ValueError(f"LLaDAMoEModelLM needs a config with arch 'llada_moe', got {config.arch!r}.")
        super().__init__(config)
