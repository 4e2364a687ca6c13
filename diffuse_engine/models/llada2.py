"""LLaDA2.x (``model_type: "llada2_moe"``, inclusionAI/LLaDA2.0-mini / -flash): block diffusion on the Ling 2.0
mixture-of-experts layout, with the parameter names of its ``modeling_llada2_moe.py``:
``model.{word_embeddings, layers.N.{attention.{query_key_value, query_layernorm, key_layernorm, dense},
mlp.*, input_layernorm, post_attention_layernorm}, norm}`` and ``lm_head``. The first ``first_k_dense_replace``
layers have a SwiGLU ``mlp.{gate,up,down}_proj``; the others ``mlp.gate.{weight, expert_bias}`` (router),
``mlp.experts.{j}.{gate,up,down}_proj`` (stacked here into ``mlp.experts.{gate,up,down}_proj``) and
``mlp.shared_experts.{gate,up,down}_proj``.

Attention: fused q/k/v (GQA), per-head RMSNorm of q and k, then RoPE on the first ``rotary_dim`` dims of each
head (partial RoPE, laid out for the engine's whole-head rotation by :func:`~.layers.rotary_permutation`),
block-causal over blocks of ``block_size``. Router (fp32): sigmoid scores; the pick adds ``expert_bias`` and keeps
the best ``topk_group`` of ``n_group`` groups; weights are the unbiased scores, normalised and scaled by
``routed_scaling_factor``. Logits are not shifted.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .base import DiffusionLM
from .layers import RMSNorm, Rotary, TokenLayout, attend, rotary_permutation, row_linear, sum_over_ranks
from .moe import Router, RouterSpec, StackedExperts, SwiGLU


class HeadPermutation:
    """Applies :func:`~.layers.rotary_permutation` to the last dim of q and k (identity without partial RoPE); the
    index is built once per device (not a buffer: a model built on the meta device still gets real indices). It
    moves dims within each head, so it is the same for any subset of heads (a tensor-parallel rank's own)."""

    def __init__(self, head_dim: int, rotary_dim: int) -> None:
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim >= self.head_dim:
            return x
        idx = self.on.get(x.device)
        if idx is None:
            idx = self.on[x.device] = rotary_permutation(self.head_dim, self.rotary_dim, x.device)
        return x.index_select(-1, idx)


def norm_rope_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: tuple[RMSNorm, RMSNorm],
                     perm: HeadPermutation, layout: TokenLayout, layer: int, rope: Rotary) -> torch.Tensor:
    """Per-head RMSNorm of q ``[N, H, D]`` and k ``[N, KV, D]``, the partial-RoPE layout, then attention."""
    q, k = perm(norms[0](q)), perm(norms[1](k))
    return attend(q, k, v, layout, layer, rope).reshape(q.shape[0], -1)


def llada2_router_spec(c: ModelConfig) -> RouterSpec:
    return RouterSpec(top_k=c.num_experts_per_tok, score=c.score_function, n_group=c.n_group,
                      topk_group=c.topk_group, normalize=c.norm_topk_prob, scale=float(c.routed_scaling_factor))


class _Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.query_key_value = nn.Linear(d, (c.num_heads + 2 * c.num_kv_heads) * hd, bias=c.qkv_bias)
        self.query_layernorm = RMSNorm(hd, c.rms_norm_eps)
        self.key_layernorm = RMSNorm(hd, c.rms_norm_eps)
        self.dense = nn.Linear(c.num_heads * hd, d, bias=False)


class LLaDA2SparseMoe(nn.Module):
    """Router, routed experts and (when ``num_shared_experts``) the shared experts of one MoE layer."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(c.hidden_size, c.num_experts, llada2_router_spec(c), own_bias=c.expert_bias, fp32=True)
        self.experts = StackedExperts(c.num_experts, c.hidden_size, c.moe_intermediate_size)
        if c.num_shared_experts:
            self.shared_experts = SwiGLU(c.hidden_size, c.num_shared_experts * c.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        out = self.experts(x, ids, weights)
        shared = getattr(self, "shared_experts", None)
        return out if shared is None else out + shared(x)


class LLaDA2Layer(nn.Module):
    tp = None  # tensor-parallel context of a sharded layer (see DiffusionLM.tp)

    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.attention = _Attention(c)
        self.mlp = LLaDA2SparseMoe(c) if c.is_moe_layer(layer) else SwiGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.perm = HeadPermutation(c.head_dim, c.rotary_dim)

    def forward(self, h: torch.Tensor, rope: Rotary, layout: TokenLayout) -> torch.Tensor:
        n, at = h.shape[0], self.attention
        x = self.input_layernorm(h)
        qkv = ops.linear(x, at.query_key_value.weight, at.query_key_value.bias)  # a rank's: its q | k | v heads
        q, k, v = qkv.view(n, -1, self.head_dim).split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        a = norm_rope_attend(q, k, v, (at.query_layernorm, at.key_layernorm), self.perm, layout, self.layer, rope)
        h = h + row_linear(a, at.dense.weight, None, self.tp)
        return h + sum_over_ranks(self.mlp(self.post_attention_layernorm(h)), self.tp)


class _Model(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LLaDA2Layer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LLaDA2MoeModelLM(DiffusionLM):
    """A LLaDA2.x checkpoint. Its config must have ``arch == "llada2"``."""

    def __init__(self, config: ModelConfig) -> None:
        if config.arch != "llada2":
            raise ValueError(f"LLaDA2MoeModelLM needs a config with arch 'llada2', got {config.arch!r}.")
        super().__init__(config)
        self.model = _Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(input_ids)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.word_embeddings.weight if self.config.tie_word_embeddings else self.lm_head.weight
