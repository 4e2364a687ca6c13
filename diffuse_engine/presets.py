"""Named model configurations: the published sizes and small sizes for tests and benchmarks.

Each preset carries the special tokens of its tokenizer (content -> id) and its chat template, so that
:func:`diffuse_engine.checkpoint.write_random_checkpoint` writes a complete Hugging Face-layout folder.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    config: ModelConfig
    special_tokens: dict[str, int]
    chat_template: str
    bos_token: str | None
    eos_token: str
    description: str


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
)}


def from_name(name: str) -> Preset:
    """The preset called ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}.") from None
