"""Model configuration: one dataclass for every supported architecture, read from and written to the exact
``config.json`` layouts of GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-Instruct-7B and JetLM/SDAR-*-Chat."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("llada", "dream", "sdar")

# Diffusion block size of SDAR checkpoints whose config.json does not name one (the published chat models are
# trained with blocks of 4 tokens).
SDAR_DEFAULT_BLOCK_SIZE = 4
# Id of ``<|MASK|>`` in SDAR's tokenizer, for SDAR configs that do not name their mask token (the loader prefers
# the tokenizer's id when the folder has one).
SDAR_MASK_TOKEN_ID = 151669


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
        if not isinstance(raw, dict):
            raise ValueError("config.json must hold a JSON object.")
        model_type = str(raw.get("model_type", "")).lower()
        archs = raw.get("architectures") or []
        archs = [str(a).lower() for a in archs] if isinstance(archs, list) else [str(archs).lower()]
        if model_type == "llada" or any("llada" in a for a in archs):
            return _llada_from_hf(_Keys(raw))
        if model_type == "dream" or any("dream" in a for a in archs):
            return _dream_from_hf(_Keys(raw))
        if model_type == "sdar" or any("sdar" in a for a in archs):
            return _sdar_from_hf(_Keys(raw))
        raise ValueError(f"config.json has model_type {raw.get('model_type')!r} and architectures "
                         f"{raw.get('architectures')!r}; supported are LLaDA (model_type 'llada'), Dream "
                         f"(model_type 'Dream') and SDAR (model_type 'sdar').")

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict, with the keys of the published checkpoints."""
        return {"llada": _llada_to_hf, "dream": _dream_to_hf, "sdar": _sdar_to_hf}[self.arch](self)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_REQUIRED = object()


class _Keys:
    """Typed reads of ``config.json`` values; every error names the key. ``source`` records which key gave each
    ModelConfig field, so that the cross-field checks of :func:`_build` can name keys too."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.source: dict[str, str] = {}

    def _value(self, field_name: str | None, key: str, default: Any) -> tuple[Any, bool]:
        """(value, whether config.json gave it); a null value counts as absent."""
        if field_name is not None:
            self.source[field_name] = key
        value = self.raw.get(key)
        if value is not None:
            return value, True
        if default is _REQUIRED:
            raise ValueError(f"config.json lacks the required key {key!r}.")
        return default, False

    def read_int(self, field_name: str, key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> Any:
        value, given = self._value(field_name, key, default)
        return _as_int(key, value, minimum) if given else value

    def read_float(self, field_name: str, key: str, default: float) -> float:
        value, _ = self._value(field_name, key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"config.json: {key} must be a finite positive number, got {value!r}.")
        return float(value)

    def read_bool(self, key: str, default: bool) -> bool:
        value, _ = self._value(None, key, default)
        if not isinstance(value, bool):
            raise ValueError(f"config.json: {key} must be true or false, got {value!r}.")
        return value

    def read_str(self, key: str, default: str) -> str:
        value, _ = self._value(None, key, default)
        if not isinstance(value, str):
            raise ValueError(f"config.json: {key} must be a string, got {value!r}.")
        return value

    def require(self, key: str, expected: Any, what: str) -> None:
        if key in self.raw and self.raw[key] is not None and self.raw[key] != expected:
            raise ValueError(f"config.json sets {key}={self.raw[key]!r}; {what} is not supported (expected "
                             f"{expected!r}).")


def _as_int(key: str, value: Any, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``; bools, strings and non-integral floats are refused."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json: {key} must be {what}, got {value!r}.")
    return value


_TOKEN_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")


def _token_ids(keys: _Keys, defaults: dict[str, Any]) -> dict[str, int | None]:
    return {f: keys.read_int(f, f, defaults.get(f), minimum=0) for f in _TOKEN_FIELDS}


def _build(keys: _Keys, **fields: Any) -> ModelConfig:
    """The cross-field checks of every family, naming the ``config.json`` keys, then the ModelConfig."""
    src = keys.source
    heads, kv, hidden = fields["num_heads"], fields["num_kv_heads"], fields["hidden_size"]
    if fields.get("explicit_head_dim") is None and hidden % heads:
        raise ValueError(f"config.json: {src['hidden_size']} ({hidden}) must be divisible by {src['num_heads']} "
                         f"({heads}).")
    if heads % kv:
        raise ValueError(f"config.json: {src['num_heads']} ({heads}) must be divisible by {src['num_kv_heads']} "
                         f"({kv}).")
    head_dim = fields.get("explicit_head_dim") or hidden // heads
    if head_dim % 2:
        key = "head_dim" if fields.get("explicit_head_dim") else f"{src['hidden_size']} / {src['num_heads']}"
        raise ValueError(f"config.json: {key} ({head_dim}) must be even for rotary embeddings.")
    vocab = fields["vocab_size"]
    for name in _TOKEN_FIELDS:
        value = fields.get(name)
        if value is not None and value >= vocab:
            raise ValueError(f"config.json: {src.get(name, name)} ({value}) is not a token id below "
                             f"{src['vocab_size']} ({vocab}).")
    try:
        return ModelConfig(**fields)
    except ValueError as exc:  # a check the dataclass makes and the keys above do not (field names = keys)
        raise ValueError(f"config.json: {exc}") from None


def _llada_from_hf(keys: _Keys) -> ModelConfig:
    raw = keys.raw
    keys.require("block_type", "llama", "a block type other than 'llama'")
    keys.require("layer_norm_type", "rms", "a norm other than RMSNorm")
    keys.require("alibi", False, "ALiBi")
    keys.require("rope", True, "a model without RoPE")
    keys.require("attention_layer_norm", False, "q/k layer norm")
    keys.require("scale_logits", False, "logit scaling")
    keys.require("include_bias", False, "linear biases")
    keys.require("bias_for_layer_norm", False, "norm biases")
    keys.require("input_emb_norm", False, "input embedding norm")
    act = raw.get("activation_type", "silu")
    if act not in ("silu", "swiglu"):
        raise ValueError(f"config.json sets activation_type={act!r}; only 'silu' (SwiGLU) is supported.")
    d_model = keys.read_int("hidden_size", "d_model")
    n_heads = keys.read_int("num_heads", "n_heads")
    if keys.read_bool("multi_query_attention", False):
        keys.source["num_kv_heads"] = "multi_query_attention"
        n_kv = 1
    else:
        n_kv = keys.read_int("num_kv_heads", "n_kv_heads", n_heads)
    if raw.get("mlp_hidden_size") is not None:
        mlp = keys.read_int("intermediate_size", "mlp_hidden_size")
    else:
        ratio = keys.read_float("intermediate_size", "mlp_ratio", 4)
        mlp = _as_int("mlp_ratio * d_model", ratio * d_model, 1)
    if raw.get("embedding_size") is not None:
        vocab = keys.read_int("vocab_size", "embedding_size")
    else:
        vocab = keys.read_int("vocab_size", "vocab_size")
    known = set(_LLADA_DEFAULTS) | {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "mlp_ratio",
                                    "embedding_size", "vocab_size", "rms_norm_eps", "rope_theta",
                                    "max_sequence_length", "include_qkv_bias", "weight_tying", "mask_token_id",
                                    "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id", "torch_dtype"}
    return _build(
        keys,
        arch="llada",
        hidden_size=d_model,
        num_layers=keys.read_int("num_layers", "n_layers"),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        intermediate_size=mlp,
        vocab_size=vocab,
        **_token_ids(keys, {"mask_token_id": 126336, "eos_token_id": 126081}),
        max_position_embeddings=keys.read_int("max_position_embeddings", "max_sequence_length", 4096),
        rms_norm_eps=keys.read_float("rms_norm_eps", "rms_norm_eps", 1e-5),
        rope_theta=keys.read_float("rope_theta", "rope_theta", 10000.0),
        qkv_bias=keys.read_bool("include_qkv_bias", False),
        tie_word_embeddings=keys.read_bool("weight_tying", False),
        torch_dtype=keys.read_str("torch_dtype", "bfloat16"),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _refuse_unsupported_qwen(raw: dict[str, Any]) -> None:
    """Qwen2 / Qwen3 options the models do not implement (Dream and SDAR configs)."""
    if raw.get("use_sliding_window"):
        raise ValueError("config.json sets use_sliding_window=true; sliding-window attention is not supported.")
    if raw.get("rope_scaling"):
        raise ValueError(f"config.json sets rope_scaling={raw['rope_scaling']!r}; RoPE scaling is not supported.")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json sets hidden_act={act!r}; only 'silu' is supported.")


def _qwen_fields(keys: _Keys, max_len: int, rms_eps: float, theta: float) -> dict[str, Any]:
    """The fields that Dream (Qwen2) and SDAR (Qwen3) configs spell alike."""
    _refuse_unsupported_qwen(keys.raw)
    n_heads = keys.read_int("num_heads", "num_attention_heads")
    return dict(
        hidden_size=keys.read_int("hidden_size", "hidden_size"),
        num_layers=keys.read_int("num_layers", "num_hidden_layers"),
        num_heads=n_heads,
        num_kv_heads=keys.read_int("num_kv_heads", "num_key_value_heads", n_heads),
        intermediate_size=keys.read_int("intermediate_size", "intermediate_size"),
        vocab_size=keys.read_int("vocab_size", "vocab_size"),
        max_position_embeddings=keys.read_int("max_position_embeddings", "max_position_embeddings", max_len),
        rms_norm_eps=keys.read_float("rms_norm_eps", "rms_norm_eps", rms_eps),
        rope_theta=keys.read_float("rope_theta", "rope_theta", theta),
        tie_word_embeddings=keys.read_bool("tie_word_embeddings", False),
        torch_dtype=keys.read_str("torch_dtype", "bfloat16"),
    )


def _dream_from_hf(keys: _Keys) -> ModelConfig:
    known = set(_DREAM_DEFAULTS) | {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                    "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
                                    "max_position_embeddings", "tie_word_embeddings", "mask_token_id",
                                    "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id", "torch_dtype"}
    return _build(
        keys,
        arch="dream",
        **_qwen_fields(keys, 131072, 1e-6, 1000000.0),
        **_token_ids(keys, {"mask_token_id": _REQUIRED, "eos_token_id": _REQUIRED}),
        qkv_bias=True,
        extra={k: v for k, v in keys.raw.items() if k not in known},
    )


def _sdar_from_hf(keys: _Keys) -> ModelConfig:
    known = set(_SDAR_DEFAULTS) | {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
                                   "max_position_embeddings", "attention_bias", "tie_word_embeddings",
                                   "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id",
                                   "torch_dtype", "block_size"}
    return _build(
        keys,
        arch="sdar",
        **_qwen_fields(keys, 32768, 1e-6, 10000.0),
        **_token_ids(keys, {"mask_token_id": SDAR_MASK_TOKEN_ID, "eos_token_id": _REQUIRED}),
        qkv_bias=keys.read_bool("attention_bias", False),
        # Qwen3 configs always state head_dim; it need not be hidden_size / num_attention_heads
        explicit_head_dim=keys.read_int("explicit_head_dim", "head_dim"),
        block_size=keys.read_int("block_size", "block_size", SDAR_DEFAULT_BLOCK_SIZE),
        extra={k: v for k, v in keys.raw.items() if k not in known},
    )


# Keys of the published config.json files that carry no information we use, with their published values.
_LLADA_DEFAULTS: dict[str, Any] = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
    "flash_attention": False, "include_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "model_type": "llada", "multi_query_attention": None, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rope": True, "rope_full_precision": True, "scale_logits": False,
    "transformers_version": "4.46.3", "use_cache": False,
}

_DREAM_DEFAULTS: dict[str, Any] = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": 28, "model_type": "Dream",
    "rope_scaling": None, "sliding_window": None, "transformers_version": "4.46.2", "use_cache": False,
    "use_sliding_window": False,
}


_SDAR_DEFAULTS: dict[str, Any] = {
    "architectures": ["SDARForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "sdar", "rope_scaling": None,
    "sliding_window": None, "transformers_version": "4.52.4", "use_cache": False, "use_sliding_window": False,
}


def _llada_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = dict(_LLADA_DEFAULTS)
    out.update(c.extra)
    out.update({
        "d_model": c.hidden_size, "n_layers": c.num_layers, "n_heads": c.num_heads, "n_kv_heads": c.num_kv_heads,
        "mlp_hidden_size": c.intermediate_size, "mlp_ratio": max(1, c.intermediate_size // c.hidden_size),
        "embedding_size": c.vocab_size, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_sequence_length": c.max_position_embeddings,
        "include_qkv_bias": c.qkv_bias, "weight_tying": c.tie_word_embeddings, "mask_token_id": c.mask_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
        "torch_dtype": c.torch_dtype,
    })
    if c.bos_token_id is not None:
        out["bos_token_id"] = c.bos_token_id
    if c.eot_token_id is not None:
        out["eot_token_id"] = c.eot_token_id
    return dict(sorted(out.items()))


def _dream_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = dict(_DREAM_DEFAULTS)
    out.update(c.extra)
    out.update({
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "mask_token_id": c.mask_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
        "bos_token_id": c.bos_token_id if c.bos_token_id is not None else c.eos_token_id,
        "torch_dtype": c.torch_dtype,
    })
    if c.eot_token_id is not None:
        out["eot_token_id"] = c.eot_token_id
    return dict(sorted(out.items()))


def _sdar_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = dict(_SDAR_DEFAULTS)
    out.update(c.extra)
    out.update({
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings, "attention_bias": c.qkv_bias,
        "tie_word_embeddings": c.tie_word_embeddings, "mask_token_id": c.mask_token_id,
        "eos_token_id": c.eos_token_id, "block_size": c.block_size, "torch_dtype": c.torch_dtype,
    })
    for key in ("pad_token_id", "bos_token_id", "eot_token_id"):
        if getattr(c, key) is not None:
            out[key] = getattr(c, key)
    return dict(sorted(out.items()))
