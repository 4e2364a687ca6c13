"""Random-weight checkpoints in the Hugging Face folder layout of the published LLaDA, Dream, SDAR, LLaDA-MoE and
LLaDA2 models, for tests and benchmarks that must not download weights: ``config.json``, ``model.safetensors`` (or
shards with ``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json`` and, for presets with
published sampling settings, ``generation_defaults.json``. Stacked experts are written per expert, under the
published names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import presets
from .config import ModelConfig
from .loader import CONFIG_FILE, GENERATION_DEFAULTS_FILE, INDEX_FILE, WEIGHTS_FILE, parse_dtype
from .models import build_model
from .models.moe import stacked_experts, unstack
from .tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, build_byte_tokenizer

# Config field -> special-token content, per family, for a bare ModelConfig (first name wins on a shared id).
_DERIVED_SPECIALS: dict[str, tuple[tuple[str, str], ...]] = {
    "llada": (("bos_token_id", "<|startoftext|>"), ("eos_token_id", "<|endoftext|>"),
              ("mask_token_id", "<|mdm_mask|>"), ("eot_token_id", "<|eot_id|>")),
    "dream": (("eos_token_id", "<|endoftext|>"), ("eot_token_id", "<|im_end|>"), ("mask_token_id", "<|mask|>")),
    "sdar": (("eos_token_id", "<|endoftext|>"), ("eot_token_id", "<|im_end|>"), ("mask_token_id", "<|MASK|>")),
    **dict.fromkeys(("llada_moe", "llada2"), (("eos_token_id", "<|endoftext|>"), ("eot_token_id", "<|role_end|>"),
                                              ("mask_token_id", "<|mask|>"))),
}
_FAMILY_TEMPLATES = {"llada": presets.LLADA_CHAT_TEMPLATE, "dream": presets.QWEN_CHAT_TEMPLATE,
                     "sdar": presets.QWEN_CHAT_TEMPLATE, "llada_moe": presets.LING_CHAT_TEMPLATE,
                     "llada2": presets.LING_CHAT_TEMPLATE}

# Mode of every written file: readable by all (a model folder is often served by another user), whatever the
# process umask or the writer's own default.
FILE_MODE = 0o644

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def derive_special_tokens(config: ModelConfig) -> dict[str, int]:
    """Special tokens (content -> id) implied by the token ids of ``config``, named as in its family's
    published tokenizer (``<|mdm_mask|>``, ``<|endoftext|>``, ... for LLaDA; ``<|mask|>``, ``<|im_end|>`` for
    Dream; ``<|MASK|>``, ``<|im_end|>`` for SDAR). A field that is None, or whose id another name already took,
    adds nothing."""
    out: dict[str, int] = {}
    for field, content in _DERIVED_SPECIALS[config.arch]:
        token_id = getattr(config, field)
        if token_id is not None and token_id not in out.values() and content not in out:
            out[content] = token_id
    return out


def _resolve(preset: str | presets.Preset | ModelConfig, special_tokens: dict[str, int] | None,
             chat_template: str | None) -> tuple[ModelConfig, dict[str, int], str, str | None, str, dict[str, Any]]:
    """(config, special tokens, chat template, bos string, eos string, generation defaults) of ``preset``."""
    if isinstance(preset, str):
        preset = presets.from_name(preset)
    if isinstance(preset, presets.Preset):
        specials = dict(special_tokens if special_tokens is not None else preset.special_tokens)
        template = chat_template if chat_template is not None else preset.chat_template
        bos, eos = preset.bos_token, preset.eos_token
        config, defaults = preset.config, dict(preset.generation_defaults)
    elif isinstance(preset, ModelConfig):
        config = preset
        specials = dict(special_tokens if special_tokens is not None else derive_special_tokens(config))
        template = chat_template if chat_template is not None else _FAMILY_TEMPLATES[config.arch]
        bos, eos, defaults = None, "", {}
    else:
        raise ValueError(f"preset must be a preset name, a Preset or a ModelConfig, got {type(preset).__name__}.")
    # Token strings follow the special tokens actually written (the caller may have replaced them).
    by_id = {i: c for c, i in specials.items()}
    if bos not in specials:
        bos = by_id.get(config.bos_token_id) if config.arch == "llada" else None
    if eos not in specials:
        eos = by_id.get(config.eos_token_id, "")
    return config, specials, template, bos, eos, defaults


def _shard(tensors: dict[str, torch.Tensor], shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in parameter order; a tensor larger than ``shard_size`` gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.chmod(path, FILE_MODE)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, FILE_MODE)


def _clear(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Checkpoint path {folder} exists and is not a directory.")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(f"Checkpoint folder {folder} is not empty; pass overwrite=True to replace its files.")
        stale = [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json"), folder / CHAT_TEMPLATE_FILE]
        for file in stale:
            if file.is_file():
                file.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def write_random_checkpoint(path: str | Path, preset: str | presets.Preset | ModelConfig, *, seed: int = 0,
                            dtype: str | torch.dtype = "float32", shard_size: int | None = None,
                            special_tokens: dict[str, int] | None = None, chat_template: str | None = None,
                            overwrite: bool = False) -> Path:
    """Write a complete random-weight model folder at ``path`` and return it.

    ``preset`` is a preset name, a :class:`~diffuse_engine.presets.Preset` or a bare :class:`ModelConfig`
    (then ``special_tokens`` defaults to :func:`derive_special_tokens` and ``chat_template`` to the family's
    format). Weights are ``build_model(config).init_random_(seed)`` drawn in fp32 and cast to ``dtype``, under
    the model's state-dict names, so the folder is the same bytes for the same arguments. ``shard_size``
    (bytes) splits the weights into ``model-0000i-of-0000N.safetensors`` shards plus an index. The tokenizer is
    :func:`build_byte_tokenizer` over the config's vocabulary. A non-empty folder is refused unless
    ``overwrite``, which first removes the weight files and chat template a previous call may have left.
    """
    config, specials, template, bos, eos, defaults = _resolve(preset, special_tokens, chat_template)
    torch_dtype = parse_dtype(dtype)
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size <= 0):
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size!r}.")
    tokenizer = build_byte_tokenizer(config.vocab_size, specials)  # validates the ids before writing anything
    model = build_model(config, dtype=torch.float32).init_random_(seed)
    folder = save_model_folder(path, model, special_tokens=specials, chat_template=template, bos_token=bos,
                               eos_token=eos, dtype=torch_dtype, shard_size=shard_size, overwrite=overwrite,
                               tokenizer=tokenizer)
    if defaults:
        _write_json(folder / GENERATION_DEFAULTS_FILE, defaults)
    return folder


def save_model_folder(path: str | Path, model: torch.nn.Module, *, special_tokens: dict[str, int],
                      chat_template: str | None, bos_token: str | None, eos_token: str,
                      dtype: str | torch.dtype = "float32", shard_size: int | None = None, overwrite: bool = False,
                      tokenizer=None) -> Path:
    """Write ``model`` (a :class:`~diffuse_engine.models.DiffusionLM`, e.g. a trained one) as a Hugging Face
    folder at ``path``: config, weights in ``dtype`` under the model's state-dict names, the byte-level
    tokenizer with ``special_tokens`` and a tokenizer config. Other files in the folder are left alone; weight
    files are replaced only with ``overwrite``. Every file written gets mode 0644 (:data:`FILE_MODE`)."""
    config: ModelConfig = model.config
    torch_dtype = parse_dtype(dtype)
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size <= 0):
        raise ValueError(f"shard_size must be a positive number of bytes, got {shard_size!r}.")
    if tokenizer is None:
        tokenizer = build_byte_tokenizer(config.vocab_size, special_tokens)
    folder = Path(path)
    _clear(folder, overwrite)

    hf = config.to_hf()
    hf["torch_dtype"] = _DTYPE_NAMES[torch_dtype]
    _write_json(folder / CONFIG_FILE, hf)

    state = unstack(model.state_dict(), stacked_experts(model))  # experts under their published per-expert names
    tensors = {name: t.detach().to("cpu", torch_dtype).contiguous() for name, t in state.items()}
    metadata = {"format": "pt"}
    if shard_size is None:
        _save_tensors(tensors, folder / WEIGHTS_FILE, metadata)
    else:
        shards = _shard(tensors, shard_size)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_tensors(shard, folder / name, metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})

    tokenizer.save(str(folder / TOKENIZER_FILE))
    os.chmod(folder / TOKENIZER_FILE, FILE_MODE)
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for c, i in sorted(special_tokens.items(), key=lambda kv: kv[1])}
    pad = {i: c for c, i in special_tokens.items()}.get(config.pad_token_id)
    _write_json(folder / TOKENIZER_CONFIG_FILE, {
        "added_tokens_decoder": added, "bos_token": bos_token, "chat_template": chat_template,
        "clean_up_tokenization_spaces": False, "eos_token": eos_token,
        "model_max_length": config.max_position_embeddings, "pad_token": pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    return folder
