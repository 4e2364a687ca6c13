"""SDAR: block diffusion on the Qwen3 layout, with the parameter names of JetLM/SDAR-*-Chat
(``modeling_sdar.py``): ``model.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm}`` and ``lm_head`` (absent when the
embeddings are tied).

The Qwen3 layer is Dream's Qwen2 layer (:mod:`.dream`) with two changes, which it takes from the config
(``ModelConfig.qk_norm``): every head of q and k is RMS-normalised over ``head_dim`` (``q_norm`` / ``k_norm``)
before RoPE, and Qwen3's ``attention_bias`` also puts a bias on o_proj. Beyond the layer: the head dim is
explicit (``ModelConfig.explicit_head_dim``) and need not be ``hidden_size // num_heads``; logits are not
shifted (the prediction for position i is row i); and attention is block-causal over blocks of
``ModelConfig.block_size`` tokens, which the layout carries (:class:`~diffuse_engine.models.layers.TokenLayout`'s
``block_size``, set by :meth:`DiffusionLM.forward`, the engine's runner, or a KV-cache plan).
"""

from __future__ import annotations

from ..config import ModelConfig
from .dream import DreamLayer, DreamModel

SDARLayer = DreamLayer  # one decoder layer: the Qwen2 / Qwen3 layer, q/k norms per the config


class SDARModel(DreamModel):
    """An SDAR checkpoint (``model_type: "sdar"``). Its config must have ``arch == "sdar"``."""

    def __init__(self, config: ModelConfig) -> None:
        if config.arch != "sdar":
            raise ValueError(f"SDARModel needs a config with arch 'sdar', got {config.arch!r}.")
        super().__init__(config)
