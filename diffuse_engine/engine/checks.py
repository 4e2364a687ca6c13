"""The checks of :meth:`.engine.Engine.add_request`: a request that cannot run is refused when it is added, with
a sentence that says why, never when it runs."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..sampling_params import SamplingParams
from .config import EngineConfig


def check_prompt(prompt: list[int], cfg: ModelConfig, what: str = "prompt") -> list[int]:
    """``prompt`` (or the infilling suffix: ``what``) as a list of token ids of the model's vocabulary (a tensor is
    accepted); raises ValueError."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        raise ValueError(f"Engine.add_request takes token ids as its {what}; encode text with the tokenizer "
                         "(LLM.generate does).")
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
        raise ValueError(f"{what} must be a list of integer token ids.")
    if not prompt:
        raise ValueError(f"{what} is empty: a request needs at least one {what} token.")
    vocab, mask = cfg.vocab_size, cfg.mask_token_id
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
    if mask in prompt:
        raise ValueError(f"{what} contains the mask token id {mask}; it must be fully observed.")
    return list(prompt)


def check_suffix(suffix: list[int] | None, cfg: ModelConfig, retain: bool, continue_from: str | None) -> list[int]:
    """The infilling suffix as token ids (empty: no infilling); raises ValueError where infilling cannot run."""
    if suffix is None:
        return []
    if isinstance(suffix, (list, tuple)) and not suffix:
        return []
    suffix = check_prompt(suffix, cfg, "suffix")
    if getattr(cfg, "block_size", None) is not None:
        raise ValueError("infilling needs full attention: this block-diffusion model attends only to earlier "
                         "blocks, so it cannot see a suffix after the canvas.")
    if retain or continue_from is not None:
        raise ValueError("an infilling request (with a suffix) cannot retain or continue a conversation's cache.")
    return suffix


def check_params(params: SamplingParams | None) -> SamplingParams:
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}.")
    params.validate()  # frozen, but a value forced in with object.__setattr__ must not reach a step
    return params


def check_fits(prompt_len: int, params: SamplingParams, cfg: ModelConfig, config: EngineConfig,
               suffix_len: int = 0) -> None:
    """Whether a request of ``prompt_len`` tokens (and ``suffix_len`` suffix tokens) with ``params`` can ever run
    on this model and engine."""
    total = prompt_len + params.gen_length + suffix_len
    if total > cfg.max_position_embeddings:
        parts = f"prompt ({prompt_len} tokens) + gen_length ({params.gen_length})"
        parts += f" + suffix ({suffix_len} tokens)" if suffix_len else ""
        raise ValueError(f"{parts} = {total} exceeds the model's maximum length of {cfg.max_position_embeddings} "
                         "tokens.")
    tokens = total * (2 if params.cfg_scale > 0 else 1)
    if tokens > config.max_num_batched_tokens:
        raise ValueError(f"the request needs {tokens} tokens per forward, more than max_num_batched_tokens "
                         f"({config.max_num_batched_tokens}).")
    if params.confidence_eos_eot_inf and cfg.eot_token_id is None:
        raise ValueError("confidence_eos_eot_inf needs the model's end-of-turn token id, which neither its "
                         "config nor its tokenizer defines.")
    block_size = getattr(cfg, "block_size", None)
    if block_size is not None and params.block_length != block_size:
        raise ValueError(f"this block-diffusion model decodes blocks of its trained size {block_size}; set "
                         f"block_length={block_size} (got {params.block_length}).")
    if block_size is not None or params.cache != "none":
        length = -(-total // block_size) * block_size if block_size else total
        pages = -(-length // config.page_size) * (2 if params.cfg_scale > 0 else 1)
        capacity = config.kv_cache_tokens // config.page_size
        if pages > capacity:
            raise ValueError(f"the request needs {pages} KV-cache pages of {config.page_size} tokens, more "
                             f"than the whole cache holds ({capacity}); raise EngineConfig.kv_cache_tokens.")


def check_continuation(params: SamplingParams, cfg: ModelConfig, retain: bool, continue_from: str | None,
                       retained, has_tokenizer: bool) -> None:
    """``retain`` / ``continue_from`` need a KV cache and a retained request; stop strings need a tokenizer."""
    if (retain or continue_from is not None) and params.cache == "none" and getattr(cfg, "block_size", None) is None:
        raise ValueError("retain / continue_from reuse the KV cache: set SamplingParams.cache to 'prefix' or "
                         "'dual'.")
    if continue_from is not None and continue_from not in retained:
        raise ValueError(f"continue_from {continue_from!r} is not a finished request with retained pages (it "
                         f"was never retained, was already continued, or was evicted).")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need the engine's tokenizer, and this engine has none.")
