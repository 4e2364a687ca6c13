"""Model configuration: one dataclass for every supported architecture, read from and written to the exact
``config.json`` layouts of GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B and JetLM/SDAR-*-Chat (the
reading, its checks and the writing: :mod:`.config_io`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from . import config_io
from .config_io import ARCHITECTURES, SDAR_DEFAULT_BLOCK_SIZE, SDAR_MASK_TOKEN_ID

__all__ = ["ARCHITECTURES", "SDAR_DEFAULT_BLOCK_SIZE", "SDAR_MASK_TOKEN_ID", "ModelConfig"]


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
    ``hidden_size // num_heads`` (SDAR only; an SDAR config always holds it, filled from the quotient when
    not given). ``block_size``: SDAR's diffusion block (default :data:`SDAR_DEFAULT_BLOCK_SIZE`); None for the
    bidirectional families.
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

    def _check_sdar_fields(self) -> None:
        """Validate ``explicit_head_dim`` and ``block_size``, filling SDAR's defaults in place."""
        sdar = self.arch == "sdar"
        for name in ("explicit_head_dim", "block_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if not sdar:
                raise ValueError(f"{name} is only supported for arch 'sdar', but arch {self.arch!r} sets it to "
                                 f"{value!r}; leave it None.")
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.explicit_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}).")
        if sdar:
            if self.explicit_head_dim is None:
                self.explicit_head_dim = self.hidden_size // self.num_heads
            if self.block_size is None:
                self.block_size = SDAR_DEFAULT_BLOCK_SIZE

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
        """SDAR (Qwen3) RMS-normalises every head of q and k before RoPE."""
        return self.arch == "sdar"

    def num_parameters(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
            if self.arch == "sdar":  # Qwen3's attention_bias also covers o_proj
                attn += d
        if self.qk_norm:
            attn += 2 * hd
        per_layer = attn + 3 * d * self.intermediate_size + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face layout
    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a ``config.json`` dict of a LLaDA, Dream or SDAR checkpoint.

        Every value is checked under its ``config.json`` key before the config is built: sizes are positive
        integers (an integral float such as ``4.0`` is accepted; ``true``, ``4.5`` or ``"4"`` are not), token ids
        lie in ``[0, vocab_size)``, ``rms_norm_eps`` and ``rope_theta`` are finite and positive, flags are
        booleans, and the head counts divide. A violation raises a ValueError that names the key."""
        return config_io.from_hf(raw, cls)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict, with the keys of the published checkpoints."""
        return config_io.to_hf(self)
