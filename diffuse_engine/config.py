"""Model configuration: one dataclass for every supported architecture, read from and written to the exact
``config.json`` layouts of GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B and JetLM/SDAR-*-Chat (the
reading, its checks and the writing: :mod:`.config_io`), and of inclusionAI/LLaDA-MoE-7B-A1B-* and
inclusionAI/LLaDA2.0-* (mixture of experts: :mod:`.config_moe`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from . import config_io, config_moe
from .config_io import SDAR_DEFAULT_BLOCK_SIZE, SDAR_MASK_TOKEN_ID
from .config_moe import LLADA2_DEFAULT_BLOCK_SIZE, MOE_ARCHITECTURES

ARCHITECTURES = config_io.ARCHITECTURES + MOE_ARCHITECTURES
# Block-diffusion families (block-causal attention, exact cache of finished blocks) and their default block size.
BLOCK_DIFFUSION_ARCHS = {"sdar": SDAR_DEFAULT_BLOCK_SIZE, "llada2": LLADA2_DEFAULT_BLOCK_SIZE}

__all__ = ["ARCHITECTURES", "BLOCK_DIFFUSION_ARCHS", "MOE_ARCHITECTURES", "SDAR_DEFAULT_BLOCK_SIZE",
           "SDAR_MASK_TOKEN_ID", "ModelConfig"]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(slots=True)
class ModelConfig:
    """Architecture of a masked-diffusion LM.

    ``arch`` is ``"llada"`` (bidirectional Llama, no GQA, no biases), ``"dream"`` (Qwen2.5 layout: GQA,
    q/k/v biases, shifted logits: the prediction for position i is read from the logits at i - 1) or ``"sdar"``
    (Qwen3 layout: GQA, per-head RMSNorm of q and k before RoPE, an explicit head dim, unshifted logits, and
    block-causal attention over blocks of ``block_size`` tokens).
    ``vocab_size`` is the number of embedding rows and logits columns. ``eot_token_id`` is the
    end-of-turn token of the chat format (LLaDA ``<|eot_id|>``, Dream and SDAR ``<|im_end|>``); it is not part
    of the published config files and is resolved from the tokenizer when absent.
    ``qkv_bias``: q/k/v projection biases; for SDAR it is Qwen3's ``attention_bias``, which also gives the
    output projection a bias. ``explicit_head_dim``: the per-head width when it is not
    ``hidden_size // num_heads`` (SDAR and LLaDA2 only; their configs always hold it, filled from the quotient when
    not given). ``block_size``: the diffusion block of the block-diffusion families (:data:`BLOCK_DIFFUSION_ARCHS`:
    SDAR 4, LLaDA2 32 by default); None for the bidirectional families.

    Mixture of experts (``"llada_moe"``: LLaDA-MoE, bidirectional; ``"llada2"``: LLaDA2.x, block diffusion; both
    with per-head q/k RMSNorm before RoPE): layers ``>= first_k_dense_replace`` replace the SwiGLU MLP of width
    ``intermediate_size`` by ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, of which the router
    picks ``num_experts_per_tok`` per token, plus ``num_shared_experts`` always-on experts (one SwiGLU of width
    ``num_shared_experts * moe_intermediate_size``). Router: ``score_function`` (softmax / sigmoid) of the router
    logits; ``expert_bias`` adds a learned per-expert bias (LLaDA2: to pick only; LLaDA-MoE: to pick and weigh);
    the pick is the top-k within the best ``topk_group`` of ``n_group`` expert groups; weights are normalised when
    ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``. ``partial_rotary_factor``: the fraction of each
    head that RoPE rotates (:attr:`rotary_dim`).
    """

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eot_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    explicit_head_dim: int | None = None
    block_size: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    score_function: str = "softmax"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    expert_bias: bool = False
    partial_rotary_factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}.")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self._check_sdar_fields()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}).")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings.")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id"):
            value = getattr(self, name)
            if value is None and name in ("pad_token_id", "bos_token_id", "eot_token_id"):
                continue
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}.")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}.")
        config_moe.check_moe_fields(self)
        config_moe.check_partial_rope(self)

    def _check_sdar_fields(self) -> None:
        """Validate ``explicit_head_dim`` and ``block_size``, filling the block-diffusion families' defaults in
        place."""
        sdar = self.arch in BLOCK_DIFFUSION_ARCHS
        for name in ("explicit_head_dim", "block_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if not sdar:
                raise ValueError(f"{name} is only supported for arch {' or '.join(map(repr, BLOCK_DIFFUSION_ARCHS))}, "
                                 f"but arch {self.arch!r} sets it to {value!r}; leave it None.")
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.explicit_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}).")
        if sdar:
            if self.explicit_head_dim is None:
                self.explicit_head_dim = self.hidden_size // self.num_heads
            if self.block_size is None:
                self.block_size = BLOCK_DIFFUSION_ARCHS[self.arch]

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``explicit_head_dim`` when set, else ``hidden_size // num_heads``."""
        if self.explicit_head_dim is not None:
            return self.explicit_head_dim
        return self.hidden_size // self.num_heads

    @property
    def shifted_logits(self) -> bool:
        """Dream predicts token i from the logits at position i - 1 (LLaDA and SDAR read row i)."""
        return self.arch == "dream"

    @property
    def qk_norm(self) -> bool:
        """SDAR (Qwen3), LLaDA-MoE and LLaDA2 RMS-normalise every head of q and k before RoPE."""
        return self.arch in ("sdar", *MOE_ARCHITECTURES)

    @property
    def rotary_dim(self) -> int:
        """How many dims of each head RoPE rotates (the first ones): ``head_dim * partial_rotary_factor``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        """Layers whose MLP is a mixture of experts (0 for the dense families)."""
        return 0 if self.num_experts is None else self.num_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts is not None and layer >= self.first_k_dense_replace

    def expert_parameters(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * (self.moe_intermediate_size or 0)

    def num_parameters(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
            if self.arch == "sdar":  # Qwen3's attention_bias also covers o_proj
                attn += d
        if self.qk_norm:
            attn += 2 * hd
        moe = self.num_moe_layers
        mlp = (self.num_layers - moe) * 3 * d * self.intermediate_size
        if moe:
            router = self.num_experts * d + (self.num_experts if self.expert_bias else 0)
            shared = self.num_shared_experts * self.expert_parameters()
            mlp += moe * (self.num_experts * self.expert_parameters() + router + shared)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * (attn + 2 * d) + mlp + d + head

    def active_parameters(self) -> int:
        """Parameters that one token's forward uses: all of them but the routed experts it is not sent to
        (``num_experts - num_experts_per_tok`` per MoE layer). Equals :meth:`num_parameters` for dense models."""
        if not self.num_moe_layers:
            return self.num_parameters()
        idle = (self.num_experts - self.num_experts_per_tok) * self.expert_parameters()
        return self.num_parameters() - self.num_moe_layers * idle

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face layout
    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a ``config.json`` dict of a LLaDA, Dream, SDAR, LLaDA-MoE or LLaDA2 checkpoint.

        Every value is checked under its ``config.json`` key before the config is built: sizes are positive
        integers (an integral float such as ``4.0`` is accepted; ``true``, ``4.5`` or ``"4"`` are not), token ids
        lie in ``[0, vocab_size)``, ``rms_norm_eps`` and ``rope_theta`` are finite and positive, flags are
        booleans, and the head counts divide. A violation raises a ValueError that names the key."""
        if isinstance(raw, dict) and config_moe.detect(raw) is not None:
            return config_moe.from_hf(raw, cls)
        return config_io.from_hf(raw, cls)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict, with the keys of the published checkpoints."""
        return config_moe.to_hf(self) if self.arch in MOE_ARCHITECTURES else config_io.to_hf(self)
