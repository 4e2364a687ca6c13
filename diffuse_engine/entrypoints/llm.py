"""``LLM``: load a model folder and generate, the offline entry point (vLLM / nano-vllm shape)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..engine import Engine, EngineConfig, RequestOutput, StepOutput
from ..models import DiffusionLM
from ..sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """A model and its engine.

    ``LLM(model_path, device=None, dtype=None)`` loads a Hugging Face-layout folder (LLaDA, Dream or SDAR), a
    shipped model's name, or a Hugging Face Hub name ``ORG/NAME[@REVISION]`` (from the Hub cache, downloaded when
    online: :func:`~diffuse_engine.loader.resolve_model_path`).
    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to the checkpoint's dtype on CUDA and fp32
    on the CPU. Every weight is checked for NaN / inf as it loads (a
    :class:`~diffuse_engine.errors.CheckpointError` names the tensor); ``check_weights=False`` or
    ``DIFFUSE_CHECK_WEIGHTS=0`` skips that. ``LLM.model`` is the ``nn.Module`` (its ``forward(input_ids,
    attention_mask=None)`` returns logits ``[batch, seq, vocab]``), ``LLM.tokenizer`` the tokenizer (None for a
    weights-only folder).

    ``tensor_parallel_size=N`` (or ``EngineConfig.tensor_parallel_size``) shards the model over N ranks
    (:mod:`diffuse_engine.distributed`): N GPUs (``cuda:0`` .. ``cuda:N-1``, NCCL) or N CPU processes (gloo). The
    engine starts its N - 1 worker processes itself, or joins a ``torchrun`` launch with
    ``EngineConfig(distributed_init="env")``; :meth:`close` (or leaving a ``with`` block) stops them. On the CPU the
    ranks share the cores: each (the calling process included) keeps at most ``cores // N`` torch threads.
    """

    def __init__(self, model_path: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, engine_config: EngineConfig | None = None, *,
                 check_weights: bool | None = None, tensor_parallel_size: int | None = None) -> None:
        from ..loader import load_model, resolve_model_path
        from ..sampling_params import read_generation_defaults

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        config = engine_config or EngineConfig()
        if tensor_parallel_size is not None:
            config = dataclasses.replace(config, tensor_parallel_size=tensor_parallel_size)
        self._runtime = None
        folder = resolve_model_path(model_path)  # once: a Hub name may ask the Hub
        if config.tensor_parallel_size > 1:
            from ..distributed import launch

            model, _, tokenizer, self._runtime = launch(
                folder, size=config.tensor_parallel_size, device=device, dtype=dtype, check_weights=check_weights,
                init=config.distributed_init, timeout_s=config.distributed_timeout_s)
        else:
            model, _, tokenizer = load_model(folder, device=device, dtype=dtype, check_weights=check_weights)
        try:
            self.engine = Engine(model, tokenizer, config)
        except BaseException:
            self.close()
            raise
        self.generation_defaults = read_generation_defaults(folder)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at interpreter exit). Idempotent; the
        engine cannot run steps afterwards."""
        runtime, self._runtime = getattr(self, "_runtime", None), None
        if runtime is not None:
            runtime.shutdown()
            if getattr(self, "engine", None) is not None and self.engine.broken is None:
                self.engine.broken = "the engine was closed (LLM.close); start a new one."

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_model(cls, model: DiffusionLM, tokenizer=None, engine_config: EngineConfig | None = None) -> LLM:
        """Wrap an already built model (e.g. random weights for a benchmark)."""
        llm = cls.__new__(cls)
        llm._runtime = None
        llm.engine = Engine(model, tokenizer, engine_config)
        llm.generation_defaults = {}
        return llm

    def default_params(self, effort: str | float | None = None, **overrides) -> SamplingParams:
        """SamplingParams from the model folder's ``generation_defaults.json`` (e.g. a trained task model's
        canvas and block size), with ``overrides`` on top. Overriding ``gen_length`` drops the folder's
        ``block_length`` and ``steps`` (they were chosen for its canvas) unless they are overridden too; a
        block-diffusion model (SDAR, LLaDA2) then keeps its trained block size.
        ``effort``: ``"low"``, ``"medium"``, ``"high"`` or a number in [0, 1], the decoding policy's knob for this
        model's family (:mod:`diffuse_engine.policies.effort`, with the measured table); it beats the folder's
        defaults, ``overrides`` beat it."""
        from ..policies.effort import params_with_effort

        base = dict(self.generation_defaults)
        if "gen_length" in overrides:
            base.pop("block_length", None)
            base.pop("steps", None)
            block = getattr(self.config, "block_size", None)
            if block and "block_length" not in overrides:  # a block-diffusion model decodes its trained blocks
                base["block_length"] = block
        return params_with_effort(effort, self.config.arch, base, overrides)

    @property
    def model(self) -> DiffusionLM:
        return self.engine.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.model_config

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer.json: pass prompts as lists of token ids.")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            return prompt.tolist()
        return list(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_step: Callable[[list[StepOutput]], None] | None = None,
                 suffix: Prompt | Sequence[Prompt | None] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts (strings or token-id lists); returns one output per
        prompt, in order. ``params`` is shared, or one per prompt (None: :meth:`default_params`). ``on_step``
        sees every step's outputs. ``suffix``: infilling, the text (or token ids) that follows each canvas: one for a
        single prompt, else one per prompt (None where a prompt has none); see :meth:`infill`."""
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                              and all(isinstance(t, int) for t in prompts))
        if single:
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given.")
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.default_params()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per "
                             f"prompt.")
        suffixes = self._suffixes(suffix, len(prompts), single)
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, p, s in zip(prompts, params, suffixes, strict=True):
                ids.append(self.engine.add_request(self.encode(prompt), p, suffix=s))
            pending = set(ids)
            while pending:
                step = self.engine.step()
                if not step:
                    raise RuntimeError("the engine made no progress while requests were pending.")
                for out in step:
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out.output
                        pending.discard(out.request_id)
                if on_step is not None:
                    on_step(step)
        except BaseException:  # all or nothing (also on KeyboardInterrupt): no request of this call stays queued
            for rid in ids:
                if rid not in results:
                    self.engine.abort(rid)
            raise
        return [results[rid] for rid in ids]

    def _suffixes(self, suffix: object, n: int, single: bool) -> list[list[int] | None]:
        if suffix is None:
            return [None] * n
        if single:
            suffix = [suffix]
        elif isinstance(suffix, (str, torch.Tensor)) or not isinstance(suffix, Sequence) or len(suffix) != n:
            raise ValueError(f"suffix must be one entry per prompt ({n} prompts), each a string, token ids or None.")
        out = []
        for s in suffix:
            if s is not None and not isinstance(s, (str, list, tuple, torch.Tensor)):
                raise ValueError(f"a suffix must be a string or a list of token ids; got {type(s).__name__}.")
            out.append(None if s is None or (isinstance(s, str) and not s) else self.encode(s))
        return out

    def infill(self, prefix: Prompt, suffix: Prompt, length: int | None = None,
               params: SamplingParams | None = None, **kwargs) -> RequestOutput:
        """Write ``length`` tokens between ``prefix`` and ``suffix`` (fill-in-the-middle): the suffix is fixed,
        never masked, and every denoising step attends to it. ``length`` defaults to ``params.gen_length`` (or the
        folder's default); the middle is decoded in blocks left to right (``block_length``). Full-attention models
        (LLaDA, Dream) only: a block-diffusion model raises ValueError. Returns the middle's output."""
        if length is not None and params is not None and length != params.gen_length:
            raise ValueError(f"length={length} disagrees with params.gen_length={params.gen_length}; give one.")
        if params is None:
            params = self.default_params(**({"gen_length": length} if length is not None else {}))
        if suffix is None or (isinstance(suffix, (str, list, tuple)) and not suffix):
            raise ValueError("infill needs a non-empty suffix; use generate for a plain continuation.")
        return self.generate(prefix, params, suffix=suffix, **kwargs)[0]

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, **kwargs) -> list[RequestOutput]:
        """Apply the folder's chat template to one conversation or a list of them, then generate. Special-token
        text inside a message's content stays text (:meth:`Tokenizer.encode_chat`): only the template's own markers
        are special tokens."""
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer, so it has no chat template.")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not conversations:
            raise ValueError("no conversations given.")
        for c, conversation in enumerate(conversations):
            _check_conversation(conversation, f"conversations[{c}]" if len(conversations) > 1 else "messages")
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, params, **kwargs)


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _check_conversation(messages: object, where: str) -> None:
    """A conversation is a non-empty list of {"role": one of CHAT_ROLES, "content": str} (ValueError naming the
    bad field otherwise)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of messages; got {type(messages).__name__}.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}] must be a dict with 'role' and 'content'; got {type(m).__name__}.")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"{where}[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m.get('role')!r}.")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}].content must be a string; got {type(m.get('content')).__name__}.")
