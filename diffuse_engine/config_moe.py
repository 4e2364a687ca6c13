"""The mixture-of-experts families: the checks of their :class:`~.config.ModelConfig` fields, and their
``config.json`` layouts, read (every value checked under its key) and written with the published keys.

- LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*, ``model_type: "llada"`` like dense LLaDA, told apart by
  ``architectures: ["LLaDAMoEModelLM"]``): OLMoE-style layers, softmax router. Its published modeling code routes by
  ``softmax -> (+ expert_bias) -> top-k`` and ignores ``norm_topk_prob``, ``moe_router_score_function``,
  ``routed_scaling_factor`` and ``router_num_group`` / ``router_topk_group``: those keys are carried through unread.
- LLaDA2.x (inclusionAI/LLaDA2.0-mini / -flash, ``model_type: "llada2_moe"``): block diffusion on the Ling 2.0 layout;
  its router scores in fp32, picks with ``score + expert_bias`` inside the best ``topk_group`` of ``n_group`` groups,
  and weighs by the unbiased scores, normalised and scaled by ``routed_scaling_factor``.

Neither config.json names the mask id (the tokenizer's ``<|mask|>``) nor, for LLaDA2, the block size (32).
"""

from __future__ import annotations

import math
from typing import Any

from .config_io import _REQUIRED, _build, _Keys, _qwen_fields, _token_ids

MOE_ARCHITECTURES = ("llada_moe", "llada2")
# The token ids of the Ling / LLaDA2 tokenizer that both families share: <|endoftext|> and <|mask|>.
LLADA2_EOS_TOKEN_ID = 156892
LLADA2_MASK_TOKEN_ID = 156895
# LLaDA2.x decodes blocks of 32 tokens (its generate() default); config.json does not say so.
LLADA2_DEFAULT_BLOCK_SIZE = 32
SCORE_FUNCTIONS = ("softmax", "sigmoid")

# ModelConfig field -> its value for a model without experts.
MOE_FIELD_DEFAULTS: dict[str, Any] = {
    "num_experts": None, "num_experts_per_tok": None, "moe_intermediate_size": None, "num_shared_experts": 0,
    "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "score_function": "softmax",
    "routed_scaling_factor": 1.0, "norm_topk_prob": False, "expert_bias": False, "partial_rotary_factor": 1.0,
}


def _count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_moe_fields(c: Any) -> None:
    """Validate the MoE and partial-RoPE fields of the config ``c``; each error names the field."""
    if c.arch not in MOE_ARCHITECTURES:
        for name, default in MOE_FIELD_DEFAULTS.items():
            if getattr(c, name) != default:
                raise ValueError(f"{name} is only supported for arch {' or '.join(MOE_ARCHITECTURES)}, but arch "
                                 f"{c.arch!r} sets it to {getattr(c, name)!r}; leave it at {default!r}.")
        return
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if not _count(getattr(c, name), 1):
            raise ValueError(f"{name} must be a positive integer for arch {c.arch!r}, got {getattr(c, name)!r}.")
    for name in ("num_shared_experts", "first_k_dense_replace"):
        if not _count(getattr(c, name), 0):
            raise ValueError(f"{name} must be an integer >= 0, got {getattr(c, name)!r}.")
    e, k = c.num_experts, c.num_experts_per_tok
    if k > e:
        raise ValueError(f"num_experts_per_tok ({k}) must be at most num_experts ({e}).")
    if c.first_k_dense_replace > c.num_layers:
        raise ValueError(f"first_k_dense_replace ({c.first_k_dense_replace}) exceeds num_layers ({c.num_layers}).")
    _check_groups(c)
    if c.score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {c.score_function!r}.")
    scale = c.routed_scaling_factor
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"routed_scaling_factor must be a finite positive number, got {scale!r}.")
    for name in ("norm_topk_prob", "expert_bias"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}.")
    if c.arch == "llada_moe":
        published = {"n_group": 1, "topk_group": 1, "score_function": "softmax", "routed_scaling_factor": 1.0,
                     "norm_topk_prob": False}
        for name, value in published.items():
            if getattr(c, name) != value:
                raise ValueError(f"{name} must be {value!r} for arch 'llada_moe' (its published router is softmax "
                                 f"top-k without groups, normalisation or scaling), got {getattr(c, name)!r}.")


def _check_groups(c: Any) -> None:
    e, k, groups, top = c.num_experts, c.num_experts_per_tok, c.n_group, c.topk_group
    if not _count(groups, 1) or not _count(top, 1):
        raise ValueError(f"n_group and topk_group must be positive integers, got {groups!r} and {top!r}.")
    if e % groups:
        raise ValueError(f"n_group ({groups}) must divide num_experts ({e}).")
    if top > groups:
        raise ValueError(f"topk_group ({top}) must be at most n_group ({groups}).")
    if top < groups and e // groups < 2:
        raise ValueError(f"group-limited routing scores a group by its two best experts: num_experts / n_group "
                         f"({e // groups}) must be at least 2.")
    if top * (e // groups) < k:
        raise ValueError(f"topk_group ({top}) groups of {e // groups} experts cannot hold num_experts_per_tok ({k}).")


def check_partial_rope(c: Any) -> None:
    f = c.partial_rotary_factor
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {f!r}.")
    rot = int(c.head_dim * f)
    if rot < 2 or rot % 2 or (c.head_dim - rot) % 2:
        raise ValueError(f"partial_rotary_factor {f} gives a rotary dim of {rot} in heads of {c.head_dim}; both the "
                         f"rotary dim and the rest of the head must be even and the rotary dim >= 2.")


# ------------------------------------------------------------------------------------------------ config.json
def detect(raw: dict[str, Any]) -> str | None:
    """The MoE arch of a ``config.json`` dict, or None for the other families."""
    model_type = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures") or []
    archs = [str(a).lower() for a in archs] if isinstance(archs, list) else [str(archs).lower()]
    if model_type == "llada2_moe" or any("llada2" in a for a in archs):
        return "llada2"
    if model_type == "lladamoe" or any("lladamoe" in a for a in archs):
        return "llada_moe"
    return None


def _common(keys: _Keys, max_len: int, rms_eps: float, theta: float | object) -> dict[str, Any]:
    """The Qwen-style fields (:func:`config_io._qwen_fields`; the MLP widths are read per family), then the MoE ones
    both families spell alike."""
    return dict(
        **_qwen_fields(keys, max_len, rms_eps, theta, intermediate=False),
        partial_rotary_factor=keys.read_float("partial_rotary_factor", "partial_rotary_factor", 1.0),
        num_experts=keys.read_int("num_experts", "num_experts"),
        num_experts_per_tok=keys.read_int("num_experts_per_tok", "num_experts_per_tok"),
        **_token_ids(keys, {"mask_token_id": LLADA2_MASK_TOKEN_ID, "eos_token_id": LLADA2_EOS_TOKEN_ID}),
    )


def _llada_moe_from_hf(keys: _Keys) -> Any:
    raw = keys.raw
    keys.require("attention_bias", False, "an attention bias")
    keys.require("clip_qkv", None, "clipping q/k/v")
    keys.require("qk_layernorm", True, "LLaDA-MoE without q/k norm")
    fields = _common(keys, 4096, 1e-5, _REQUIRED)
    expert = keys.read_int("moe_intermediate_size", "expert_intermediate_size")
    shared = keys.read_int("num_shared_experts", "shared_expert_intermediate_size", 0)
    if shared % expert:
        raise ValueError(f"config.json: shared_expert_intermediate_size ({shared}) must be a multiple of "
                         f"expert_intermediate_size ({expert}).")
    freq = raw.get("moe_layer_freq")
    dense = 0
    if freq is not None:
        layers = fields["num_layers"]
        if not isinstance(freq, list) or len(freq) != layers or any(f not in (0, 1) or isinstance(f, bool)
                                                                     for f in freq):
            raise ValueError(f"config.json: moe_layer_freq must list 0 (dense) or 1 (MoE) for each of the {layers} "
                             f"layers, got {freq!r}.")
        dense = freq.count(0)
        if freq != [0] * dense + [1] * (layers - dense):
            raise ValueError("config.json: moe_layer_freq must put its dense layers (0) first; MoE layers "
                             f"between dense ones are not supported (got {freq!r}).")
    known = set(_LLADA_MOE_DEFAULTS) | set(_LLADA_MOE_KEYS) | set(_OPTIONAL)
    return _build(
        keys, arch="llada_moe", **fields,
        intermediate_size=keys.read_int("intermediate_size", "dense_intermediate_size"),
        moe_intermediate_size=expert, num_shared_experts=shared // expert, first_k_dense_replace=dense,
        expert_bias=bool(raw.get("moe_router_enable_expert_bias") or False),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _llada2_from_hf(keys: _Keys) -> Any:
    raw = keys.raw
    keys.require("use_bias", False, "a bias on the attention output")
    keys.require("use_qk_norm", True, "LLaDA2 without q/k norm")
    keys.require("norm_head", False, "a normalised LM head")
    keys.require("router_dtype", "fp32", "a router dtype other than fp32")
    score = raw.get("score_function", "sigmoid")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"config.json: score_function must be one of {SCORE_FUNCTIONS}, got {score!r}.")
    fields = _common(keys, 16384, 1e-5, 10000.0)
    fields["partial_rotary_factor"] = keys.read_float("partial_rotary_factor", "partial_rotary_factor", 0.5)
    known = set(_LLADA2_DEFAULTS) | set(_LLADA2_KEYS) | set(_OPTIONAL)
    return _build(
        keys, arch="llada2", **fields,
        intermediate_size=keys.read_int("intermediate_size", "intermediate_size"),
        explicit_head_dim=keys.read_int("explicit_head_dim", "head_dim", fields["hidden_size"] // fields["num_heads"]),
        block_size=keys.read_int("block_size", "block_size", LLADA2_DEFAULT_BLOCK_SIZE),
        qkv_bias=keys.read_bool("use_qkv_bias", False),
        moe_intermediate_size=keys.read_int("moe_intermediate_size", "moe_intermediate_size"),
        num_shared_experts=keys.read_int("num_shared_experts", "num_shared_experts", 0, minimum=0),
        first_k_dense_replace=keys.read_int("first_k_dense_replace", "first_k_dense_replace", 0, minimum=0),
        n_group=keys.read_int("n_group", "n_group", 8), topk_group=keys.read_int("topk_group", "topk_group", 4),
        score_function=score, norm_topk_prob=keys.read_bool("norm_topk_prob", True),
        routed_scaling_factor=keys.read_float("routed_scaling_factor", "routed_scaling_factor", 2.5),
        expert_bias=keys.read_bool("moe_router_enable_expert_bias", True),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def from_hf(raw: dict[str, Any], cls: type) -> Any:
    """The ``cls`` of a MoE family's ``config.json`` dict (:func:`detect` says which)."""
    keys = _Keys(raw, cls)
    return _llada2_from_hf(keys) if detect(raw) == "llada2" else _llada_moe_from_hf(keys)


# Keys of the published config.json files that carry no information we use, with the values we write.
_LLADA_MOE_DEFAULTS: dict[str, Any] = {
    "architectures": ["LLaDAMoEModelLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig", "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                 "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    "clip_qkv": None, "hidden_act": "silu", "initializer_range": 0.02, "model_type": "llada",
    "output_router_logits": False, "qk_layernorm": True, "rope_scaling": None, "router_aux_loss_coef": 0.01,
    "use_cache": False,
}
_LLADA2_DEFAULTS: dict[str, Any] = {
    "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    "embedding_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02, "model_type": "llada2_moe",
    "norm_head": False, "output_dropout": 0.0, "output_router_logits": False, "rope_scaling": None,
    "router_dtype": "fp32", "use_bias": False, "use_cache": False, "use_qk_norm": True, "use_sliding_window": False,
}
_COMMON_KEYS: dict[str, Any] = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "vocab_size": "vocab_size", "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings", "torch_dtype": "torch_dtype",
    "partial_rotary_factor": "partial_rotary_factor", "num_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_tok", "eos_token_id": "eos_token_id", "mask_token_id": "mask_token_id",
}
_LLADA_MOE_KEYS: dict[str, Any] = {
    **_COMMON_KEYS, "dense_intermediate_size": "intermediate_size", "expert_intermediate_size": "moe_intermediate_size",
    "shared_expert_intermediate_size": lambda c: c.num_shared_experts * c.moe_intermediate_size or None,
    "moe_layer_freq": lambda c: [0] * c.first_k_dense_replace + [1] * (c.num_layers - c.first_k_dense_replace),
    "moe_router_enable_expert_bias": "expert_bias",
}
_LLADA2_KEYS: dict[str, Any] = {
    **_COMMON_KEYS, "intermediate_size": "intermediate_size", "head_dim": "head_dim", "use_qkv_bias": "qkv_bias",
    "moe_intermediate_size": "moe_intermediate_size", "num_shared_experts": "num_shared_experts",
    "first_k_dense_replace": "first_k_dense_replace", "n_group": "n_group", "topk_group": "topk_group",
    "score_function": "score_function", "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor", "moe_router_enable_expert_bias": "expert_bias",
}
_OPTIONAL = ("pad_token_id", "bos_token_id", "eot_token_id", "block_size")


def to_hf(c: Any) -> dict[str, Any]:
    """The ``config.json`` dict of a MoE config ``c`` with the keys of the published checkpoints (sorted);
    LLaDA2's ``block_size`` only when it is not the published 32."""
    defaults, keys = (_LLADA2_DEFAULTS, _LLADA2_KEYS) if c.arch == "llada2" else (_LLADA_MOE_DEFAULTS, _LLADA_MOE_KEYS)
    out = dict(defaults)
    out.update(c.extra)
    out.update({key: get(c) if callable(get) else getattr(c, get) for key, get in keys.items()})
    for key in _OPTIONAL:
        value = getattr(c, key)
        if value is not None and not (key == "block_size" and value == LLADA2_DEFAULT_BLOCK_SIZE):
            out[key] = value
    return dict(sorted(out.items()))
