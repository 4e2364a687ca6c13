"""Named model configurations: the published sizes and small sizes for tests and benchmarks.

Each preset carries the special tokens of its tokenizer (content -> id) and its chat template, so that
:func:`diffuse_engine.checkpoint.write_random_checkpoint` writes a complete Hugging Face-layout folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ModelConfig

# Chat formats of the families (SDAR uses Qwen's; the real checkpoints ship their own template in
# tokenizer_config.json).
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The chat format of LLaDA-MoE and LLaDA2.x (the Ling tokenizer's roles; the real checkpoints ship their own template,
# which also handles tools and thinking modes).
LING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = {'user': 'HUMAN', 'assistant': 'ASSISTANT', 'system': 'SYSTEM'}.get(message['role'], "
    "message['role'] | upper) %}"
    "{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class Preset:
    """A named configuration: ``generation_defaults`` are the SamplingParams fields the model is published with
    (written to ``generation_defaults.json`` by :func:`~diffuse_engine.checkpoint.write_random_checkpoint`)."""

    name: str
    config: ModelConfig
    special_tokens: dict[str, int]
    chat_template: str
    bos_token: str | None
    eos_token: str
    description: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)


def _llada_specials(base: int | None) -> dict[str, int]:
    if base is None:  # the ids of GSAI-ML/LLaDA-8B-Instruct
        return {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
                "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
    names = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|mdm_mask|>"]
    return {n: base + i for i, n in enumerate(names)}


def _dream_specials(base: int | None) -> dict[str, int]:
    if base is None:  # the ids of Dream-org/Dream-v0-Instruct-7B (Qwen2.5 tokenizer)
        return {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|mask|>": 151666}
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    return {n: base + i for i, n in enumerate(names)}


def _llada(name: str, description: str, *, d: int, layers: int, heads: int, mlp: int, vocab: int,
           specials: dict[str, int], max_len: int = 4096) -> Preset:
    config = ModelConfig(
        arch="llada", hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=heads, intermediate_size=mlp,
        vocab_size=vocab, mask_token_id=specials["<|mdm_mask|>"], eos_token_id=specials["<|endoftext|>"],
        pad_token_id=specials["<|endoftext|>"], bos_token_id=specials["<|startoftext|>"],
        eot_token_id=specials["<|eot_id|>"], max_position_embeddings=max_len, rms_norm_eps=1e-5,
        rope_theta=500000.0,
    )
    return Preset(name, config, specials, LLADA_CHAT_TEMPLATE, "<|startoftext|>", "<|endoftext|>", description)


def _dream(name: str, description: str, *, d: int, layers: int, heads: int, kv: int, mlp: int, vocab: int,
           specials: dict[str, int], max_len: int = 131072) -> Preset:
    config = ModelConfig(
        arch="dream", hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=mlp,
        vocab_size=vocab, mask_token_id=specials["<|mask|>"], eos_token_id=specials["<|endoftext|>"],
        pad_token_id=specials["<|endoftext|>"], bos_token_id=specials["<|endoftext|>"],
        eot_token_id=specials["<|im_end|>"], max_position_embeddings=max_len, rms_norm_eps=1e-6,
        rope_theta=1000000.0, qkv_bias=True,
    )
    return Preset(name, config, specials, QWEN_CHAT_TEMPLATE, None, "<|endoftext|>", description)


def _sdar_specials(base: int | None) -> dict[str, int]:
    if base is None:  # the ids of JetLM/SDAR-1.7B-Chat (Qwen3 tokenizer plus <|MASK|>)
        return {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|MASK|>": 151669}
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
    return {n: base + i for i, n in enumerate(names)}


def _sdar(name: str, description: str, *, d: int, layers: int, heads: int, kv: int, head_dim: int, mlp: int,
          vocab: int, specials: dict[str, int], block_size: int = 4, tied: bool = False,
          max_len: int = 32768) -> Preset:
    config = ModelConfig(
        arch="sdar", hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=mlp,
        vocab_size=vocab, mask_token_id=specials["<|MASK|>"], eos_token_id=specials["<|endoftext|>"],
        bos_token_id=specials["<|endoftext|>"], eot_token_id=specials["<|im_end|>"],
        max_position_embeddings=max_len, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=False,
        tie_word_embeddings=tied, explicit_head_dim=head_dim, block_size=block_size,
    )
    return Preset(name, config, specials, QWEN_CHAT_TEMPLATE, None, "<|endoftext|>", description)


def _ling_specials(base: int | None) -> dict[str, int]:
    if base is None:  # the ids that LLaDA-MoE's and LLaDA2's generate() use; the role markers' ids are not known here
        return {"<|endoftext|>": 156892, "<|mask|>": 156895}
    names = ["<|endoftext|>", "<role>", "</role>", "<|role_end|>", "<|mask|>"]
    return {n: base + i for i, n in enumerate(names)}


def _moe_config(arch: str, specials: dict[str, int], **fields: Any) -> ModelConfig:
    return ModelConfig(arch=arch, mask_token_id=specials["<|mask|>"], eos_token_id=specials["<|endoftext|>"],
                       pad_token_id=specials["<|endoftext|>"], eot_token_id=specials.get("<|role_end|>"), **fields)


def _llada_moe(name: str, description: str, *, specials: dict[str, int], defaults: dict[str, Any],
               **fields: Any) -> Preset:
    fields = {"rms_norm_eps": 1e-5, "rope_theta": 50000.0, **fields}
    config = _moe_config("llada_moe", specials, **fields)
    return Preset(name, config, specials, LING_CHAT_TEMPLATE, None, "<|endoftext|>", description, defaults)


def _llada2(name: str, description: str, *, specials: dict[str, int], defaults: dict[str, Any],
            **fields: Any) -> Preset:
    fields = {"rms_norm_eps": 1e-6, "rope_theta": 600000.0, "partial_rotary_factor": 0.5, "score_function": "sigmoid",
              "norm_topk_prob": True, "routed_scaling_factor": 2.5, "expert_bias": True, "num_shared_experts": 1,
              "first_k_dense_replace": 1, **fields}
    config = _moe_config("llada2", specials, **fields)
    return Preset(name, config, specials, LING_CHAT_TEMPLATE, None, "<|endoftext|>", description, defaults)


# Published sampling settings. LLaDA-MoE: the LLaDA generate() of its model card (128 tokens in blocks of 32, one
# token per step, greedy, low-confidence remasking). LLaDA2.x: its generate() defaults (blocks of 32, greedy,
# threshold 0.95 with at least one token per step).
LLADA_MOE_GENERATION = {"gen_length": 128, "block_length": 32, "steps": 128, "temperature": 0.0,
                        "remasking": "low_confidence"}
LLADA2_GENERATION = {"block_length": 32, "temperature": 0.0, "policy": "threshold", "threshold": 0.95,
                     "remasking": "low_confidence"}

_MOE_PRESETS = (
    _llada_moe("llada-moe-7b-a1b", "inclusionAI/LLaDA-MoE-7B-A1B-Instruct architecture (7.4B parameters, 1.7B "
               "active per token with embeddings): 16 layers, 64 experts, top-8, no shared expert.",
               hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16, intermediate_size=8192,
               num_experts=64, num_experts_per_tok=8, moe_intermediate_size=1024, vocab_size=157184,
               max_position_embeddings=8192, specials=_ling_specials(None), defaults=LLADA_MOE_GENERATION),
    _llada_moe("llada-moe-tiny", "Tiny LLaDA-MoE: byte-level vocabulary of 320, 2 layers, 8 experts, top-2 (tests).",
               hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128, num_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=320, max_position_embeddings=512,
               specials=_ling_specials(256), defaults={**LLADA_MOE_GENERATION, "gen_length": 32, "block_length": 16,
                                                        "steps": 32}),
    _llada2("llada2-mini", "inclusionAI/LLaDA2.0-mini architecture (16.3B parameters, 1.4B active): 20 layers (the "
            "first dense), 256 experts in 8 groups, top-8 from 4 groups, 1 shared expert, partial RoPE, blocks of 32.",
            hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=4, explicit_head_dim=128,
            intermediate_size=5120, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, n_group=8,
            topk_group=4, vocab_size=157184, max_position_embeddings=32768, specials=_ling_specials(None),
            defaults=LLADA2_GENERATION),
    _llada2("llada2-flash", "inclusionAI/LLaDA2.0-flash architecture (~103B parameters, ~6.1B active): 32 layers, "
            "256 experts of 1024. Assumed, not read from its config.json: the dense layer's width 9216 and the mini's "
            "router settings.",
            hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=4, explicit_head_dim=128,
            intermediate_size=9216, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024, n_group=8,
            topk_group=4, vocab_size=157184, max_position_embeddings=32768, specials=_ling_specials(None),
            defaults=LLADA2_GENERATION),
    _llada2("llada2-tiny", "Tiny LLaDA2: byte-level vocabulary of 320, 2 layers (the first dense), 8 experts in 4 "
            "groups, top-2 from 2 groups, a shared expert, GQA 4:2, head dim 32 with RoPE on 16, blocks of 8 (tests).",
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, explicit_head_dim=32, intermediate_size=128,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=4, topk_group=2, vocab_size=320,
            max_position_embeddings=512, block_size=8, specials=_ling_specials(256),
            defaults={**LLADA2_GENERATION, "block_length": 8, "gen_length": 32}),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    _llada("llada-8b", "GSAI-ML/LLaDA-8B-Instruct architecture (8.0B parameters).",
           d=4096, layers=32, heads=32, mlp=12288, vocab=126464, specials=_llada_specials(None)),
    _dream("dream-7b", "Dream-org/Dream-v0-Instruct-7B architecture (7.6B parameters).",
           d=3584, layers=28, heads=28, kv=4, mlp=18944, vocab=152064, specials=_dream_specials(None)),
    _llada("llada-small", "LLaDA-shaped with LLaDA's vocabulary and token ids, 34.5M parameters (benchmarks).",
           d=128, layers=8, heads=4, mlp=512, vocab=126464, specials=_llada_specials(None)),
    _dream("dream-small", "Dream-shaped with Dream's vocabulary and token ids, GQA 4:2 (benchmarks).",
           d=128, layers=8, heads=4, kv=2, mlp=512, vocab=152064, specials=_dream_specials(None)),
    _llada("llada-tiny", "Tiny LLaDA: byte-level vocabulary of 320, 2 layers (tests).",
           d=64, layers=2, heads=4, mlp=192, vocab=320, specials=_llada_specials(256), max_len=512),
    _dream("dream-tiny", "Tiny Dream: byte-level vocabulary of 320, 2 layers, GQA 4:2 (tests).",
           d=64, layers=2, heads=4, kv=2, mlp=192, vocab=320, specials=_dream_specials(256), max_len=512),
    _sdar("sdar-1.7b", "JetLM/SDAR-1.7B-Chat architecture (Qwen3-1.7B shape, 2.0B parameters, block size 4). "
          "Assumed, not read from its config.json: untied lm_head (SDAR-4B-Chat unties it and the 1.7B "
          "safetensors hold ~2.03B parameters) and max_position_embeddings 32768 (as SDAR-4B-Chat).",
          d=2048, layers=28, heads=16, kv=8, head_dim=128, mlp=6144, vocab=151936, specials=_sdar_specials(None)),
    _sdar("sdar-tiny", "Tiny SDAR: byte-level vocabulary of 320, 2 layers, GQA 4:2, head dim 32 != 64 / 4, "
          "block size 4 (tests).",
          d=64, layers=2, heads=4, kv=2, head_dim=32, mlp=192, vocab=320, specials=_sdar_specials(256), max_len=512),
    *_MOE_PRESETS,
)}


def from_name(name: str) -> Preset:
    """The preset called ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}.") from None
