"""``config.json`` of LLaDA, Dream and SDAR checkpoints: reading it into a :class:`~.config.ModelConfig` (every
value checked under its key) and writing one back with the keys of the published checkpoints. This module builds
the config through the class it is given and so imports nothing of the package."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

ARCHITECTURES = ("llada", "dream", "sdar")

# Diffusion block size of SDAR checkpoints whose config.json does not name one (the published chat models are
# trained with blocks of 4 tokens).
SDAR_DEFAULT_BLOCK_SIZE = 4
# Id of ``<|MASK|>`` in SDAR's tokenizer, for SDAR configs that do not name their mask token (the loader prefers
# the tokenizer's id when the folder has one).
SDAR_MASK_TOKEN_ID = 151669


def from_hf(raw: dict[str, Any], cls: type) -> Any:
    """The ``cls`` (:class:`~.config.ModelConfig`) of a ``config.json`` dict: see :meth:`ModelConfig.from_hf`."""
    if not isinstance(raw, dict):
        raise ValueError("config.json must hold a JSON object.")
    model_type = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures") or []
    archs = [str(a).lower() for a in archs] if isinstance(archs, list) else [str(archs).lower()]
    if model_type == "llada" or any("llada" in a for a in archs):
        return _llada_from_hf(_Keys(raw, cls))
    if model_type == "dream" or any("dream" in a for a in archs):
        return _dream_from_hf(_Keys(raw, cls))
    if model_type == "sdar" or any("sdar" in a for a in archs):
        return _sdar_from_hf(_Keys(raw, cls))
    raise ValueError(f"config.json has model_type {raw.get('model_type')!r} and architectures "
                     f"{raw.get('architectures')!r}; supported are LLaDA (model_type 'llada'), Dream "
                     f"(model_type 'Dream') and SDAR (model_type 'sdar').")


_REQUIRED = object()


class _Keys:
    """Typed reads of ``config.json`` values; every error names the key. ``source`` records which key gave each
    ModelConfig field, so that the cross-field checks of :func:`_build` can name keys too."""

    def __init__(self, raw: dict[str, Any], cls: type) -> None:
        self.raw = raw
        self.cls = cls  # the config class to build
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


def _build(keys: _Keys, **fields: Any) -> Any:
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
        return keys.cls(**fields)
    except ValueError as exc:  # a check the dataclass makes and the keys above do not (field names = keys)
        raise ValueError(f"config.json: {exc}") from None


def _llada_from_hf(keys: _Keys) -> Any:
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
    known = _known_keys("llada")
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


def _qwen_fields(keys: _Keys, max_len: int, rms_eps: float, theta: Any, *,
                 intermediate: bool = True) -> dict[str, Any]:
    """The fields that Dream (Qwen2), SDAR (Qwen3) and the MoE families' configs spell alike (``intermediate``:
    also ``intermediate_size``, which the MoE configs name per family). ``torch_dtype`` falls back on the newer
    ``dtype`` key."""
    _refuse_unsupported_qwen(keys.raw)
    n_heads = keys.read_int("num_heads", "num_attention_heads")
    fields = dict(
        hidden_size=keys.read_int("hidden_size", "hidden_size"),
        num_layers=keys.read_int("num_layers", "num_hidden_layers"),
        num_heads=n_heads,
        num_kv_heads=keys.read_int("num_kv_heads", "num_key_value_heads", n_heads),
        vocab_size=keys.read_int("vocab_size", "vocab_size"),
        max_position_embeddings=keys.read_int("max_position_embeddings", "max_position_embeddings", max_len),
        rms_norm_eps=keys.read_float("rms_norm_eps", "rms_norm_eps", rms_eps),
        rope_theta=keys.read_float("rope_theta", "rope_theta", theta),
        tie_word_embeddings=keys.read_bool("tie_word_embeddings", False),
        torch_dtype=keys.read_str("torch_dtype", keys.raw.get("dtype") or "bfloat16"),
    )
    if intermediate:
        fields["intermediate_size"] = keys.read_int("intermediate_size", "intermediate_size")
    return fields


def _dream_from_hf(keys: _Keys) -> Any:
    known = _known_keys("dream")
    return _build(
        keys,
        arch="dream",
        **_qwen_fields(keys, 131072, 1e-6, 1000000.0),
        **_token_ids(keys, {"mask_token_id": _REQUIRED, "eos_token_id": _REQUIRED}),
        qkv_bias=True,
        extra={k: v for k, v in keys.raw.items() if k not in known},
    )


def _sdar_from_hf(keys: _Keys) -> Any:
    known = _known_keys("sdar")
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


def _or_eos(name: str) -> Callable[[Any], int | None]:
    """The token id ``name``, or the EOS id when it is None (what the published configs hold then)."""
    return lambda c: getattr(c, name) if getattr(c, name) is not None else c.eos_token_id


# The config.json keys each family writes: key -> the ModelConfig field it holds (or a function of the config),
# and the token-id keys written only when set. Reading accepts these keys and the published defaults above.
_QWEN_KEYS: dict[str, Any] = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings", "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id",
    "torch_dtype": "torch_dtype",
}
_HF_LAYOUT: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    "llada": (_LLADA_DEFAULTS, {
        "d_model": "hidden_size", "n_layers": "num_layers", "n_heads": "num_heads", "n_kv_heads": "num_kv_heads",
        "mlp_hidden_size": "intermediate_size",
        "mlp_ratio": lambda c: max(1, c.intermediate_size // c.hidden_size),
        "embedding_size": "vocab_size", "vocab_size": "vocab_size", "rms_norm_eps": "rms_norm_eps",
        "rope_theta": "rope_theta", "max_sequence_length": "max_position_embeddings", "include_qkv_bias": "qkv_bias",
        "weight_tying": "tie_word_embeddings", "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id",
        "pad_token_id": _or_eos("pad_token_id"), "torch_dtype": "torch_dtype",
    }, ("bos_token_id", "eot_token_id")),
    "dream": (_DREAM_DEFAULTS, {**_QWEN_KEYS, "pad_token_id": _or_eos("pad_token_id"),
                                "bos_token_id": _or_eos("bos_token_id")}, ("eot_token_id",)),
    "sdar": (_SDAR_DEFAULTS, {**_QWEN_KEYS, "head_dim": "head_dim", "attention_bias": "qkv_bias",
                              "block_size": "block_size"}, ("pad_token_id", "bos_token_id", "eot_token_id")),
}


def _known_keys(arch: str) -> set[str]:
    defaults, keys, optional = _HF_LAYOUT[arch]
    return set(defaults) | set(keys) | set(optional)


def to_hf(c: Any) -> dict[str, Any]:
    """The ``config.json`` dict of the config ``c``, with the keys of the published checkpoints (sorted): the
    family's published defaults, then the keys the config did not recognise, then its own values."""
    defaults, keys, optional = _HF_LAYOUT[c.arch]
    out = {**defaults, **c.extra}
    out.update({key: get(c) if callable(get) else getattr(c, get) for key, get in keys.items()})
    out.update({key: getattr(c, key) for key in optional if getattr(c, key) is not None})
    return dict(sorted(out.items()))
