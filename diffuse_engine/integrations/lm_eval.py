"""The lm-evaluation-harness model ``diffuse-engine`` (``pip install "diffuse-engine[eval]"``; lm-eval 0.4.13).

Importing this module registers it; three ways in:

- ``diffuse-engine lm-eval ARGS...``: lm-eval's own command line, ARGS unchanged
  (``--model diffuse-engine --model_args pretrained=...,steps=...,gen_length=...,block_length=...,cache=...,
  policy=...,threshold=... --tasks ... --limit ...``); the shipped tasks (:data:`TASKS_DIR`) are on the include
  path unless ``--include_path`` names another folder;
- ``import diffuse_engine.integrations.lm_eval`` then ``lm_eval.simple_evaluate(model="diffuse-engine", ...)``;
- ``lm_eval.simple_evaluate(model=DiffuseEngineLM("addition"), ...)``.

``generate_until``: every request goes through the engine in one continuous-batching run; ``until`` strings are
stop strings (and the text is cut at the first of them); ``max_gen_toks`` is the canvas (``gen_length``), rounded up
to the block length, unless ``gen_length`` is set in ``model_args``; steps default to one token per step.
``loglikelihood``: LLaDA's Monte-Carlo estimate of the masked-diffusion bound (:mod:`..quality.likelihood`),
``mc_num`` samples, ``batch_size`` per forward, seeded by the request's text; ``is_greedy`` by greedy decoding
of the continuation's length. ``loglikelihood_rolling``: the same over the harness's rolling windows. Both need a
full-attention model (LLaDA, Dream): a block-diffusion model raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..entrypoints.llm import LLM
from ..progress import progress
from ..quality.likelihood import continuation_loglikelihood
from ..sampling_params import SamplingParams

TASKS_DIR = Path(__file__).resolve().with_name("lm_eval_tasks")
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "stop")
MODEL_KEYS = ("pretrained", "device", "dtype", "mc_num", "batch_size", "max_batch_size", "max_length",
              "check_greedy", "effort", "max_gen_toks", "tensor_parallel_size")
DEFAULT_MAX_GEN_TOKS = 256
logger = logging.getLogger("diffuse_engine.lm_eval")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"model_args {name} must be a positive integer; got {value!r}.")
    return int(value)


def _device(device: str | None) -> str | None:
    """The harness passes ``cuda:0`` unless told otherwise: without CUDA that default means the CPU."""
    import torch

    if device in ("cuda", "cuda:0") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: the diffuse-engine model runs on the CPU (--device %s ignored).", device)
        return "cpu"
    return device


def _seed(*texts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(texts).encode()).digest()[:7], "little")


@register_model("diffuse-engine")
class DiffuseEngineLM(LM):
    """A diffuse-engine model in the harness. ``pretrained``: a model folder, a shipped model's name (or what
    ``LLM`` accepts). Other keys: any :class:`SamplingParams` field but ``stop``, ``effort``, ``mc_num``
    (Monte-Carlo samples per loglikelihood request, default 128), ``batch_size`` (samples per forward, default 32;
    ``auto`` keeps the default), ``max_length`` (default: the model's), ``check_greedy`` (default true),
    ``max_gen_toks`` (default 256), ``device``, ``dtype``, ``tensor_parallel_size`` (default 1: the model sharded over
    that many GPUs or CPU processes). An unknown key or a bad value raises ValueError naming it."""

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYS) - set(MODEL_KEYS))
        if unknown:
            raise ValueError(f"model_args: unknown key {unknown[0]!r} for diffuse-engine; the keys are "
                             f"{', '.join(MODEL_KEYS)} and the SamplingParams fields ({', '.join(SAMPLING_KEYS)}).")
        if not pretrained or not isinstance(pretrained, str):
            raise ValueError("model_args pretrained is required: a model folder or a shipped model's name.")
        self.pretrained = pretrained
        self.sampling = {k: v for k, v in kwargs.items() if k in SAMPLING_KEYS}
        self.effort = kwargs.get("effort")
        self.mc_num = _positive_int("mc_num", kwargs.get("mc_num", 128))
        batch = kwargs.get("batch_size", 32)
        self.mc_batch = 32 if batch in ("auto", None) or str(batch).startswith("auto") else \
            _positive_int("batch_size", batch)
        self.mc_batch = min(self.mc_batch, self.mc_num)
        if self.mc_num % self.mc_batch:
            raise ValueError(f"model_args mc_num ({self.mc_num}) must be a multiple of batch_size ({self.mc_batch}).")
        self.check_greedy = str(kwargs.get("check_greedy", True)).lower() not in ("false", "0", "no")
        self.max_gen_toks = _positive_int("max_gen_toks", kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        tp = _positive_int("tensor_parallel_size", kwargs.get("tensor_parallel_size", 1))
        self.llm = LLM(pretrained, device=_device(kwargs.get("device")), dtype=kwargs.get("dtype"),
                       tensor_parallel_size=tp)
        self.max_length = _positive_int("max_length", kwargs.get("max_length",
                                                                 self.llm.config.max_position_embeddings))
        self._params({} if "gen_length" in self.sampling else {"gen_length": self._check_length()})
        self._device = self.llm.model.device

    # ------------------------------------------------------------------------------------------ helpers
    def _check_length(self) -> int:
        """A canvas that the given ``block_length`` / ``steps`` fit (to check them when the model is made)."""
        block, steps = self.sampling.get("block_length"), self.sampling.get("steps")
        if isinstance(block, int) and isinstance(steps, int) and block > 0 and steps > 0:
            return block * steps
        return block if isinstance(block, int) and block > 0 else 32

    def _params(self, request: dict[str, Any]) -> SamplingParams:
        """SamplingParams of one request: the folder's defaults, effort, ``model_args``, then the request's."""
        try:
            return self.llm.default_params(**({"effort": self.effort} if self.effort is not None else {}),
                                           **{**self.sampling, **request})
        except TypeError as exc:
            raise ValueError(f"model_args: {exc}") from None

    def _gen_params(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [u for u in until if isinstance(u, str) and u]
        request: dict[str, Any] = {}
        if "gen_length" not in self.sampling:
            want = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            block = self.sampling.get("block_length")
            request["gen_length"] = -(-want // block) * block if block else want
            if "steps" not in self.sampling:
                request["steps"] = request["gen_length"]
        if kwargs.get("do_sample") and kwargs.get("temperature"):
            request["temperature"] = float(kwargs["temperature"])
        if until:
            request["stop"] = until
        return self._params(request), until

    def _full_attention(self, what: str) -> None:
        if getattr(self.llm.config, "block_size", None) is not None:
            raise NotImplementedError(f"{what} needs a full-attention model (LLaDA, Dream); a block-diffusion model "
                                      "attends only to earlier blocks, so the masked-diffusion bound does not apply.")

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as the harness's models split them (trailing spaces of the context move
        to the continuation; the continuation is what the whole text adds to the context's encoding)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.llm.encode(context + continuation)
        ctx = self.llm.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------------------------------ requests
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for every request in one engine run (continuous batching); texts cut at ``until``."""
        if not requests:
            return []
        prompts, params, cuts = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            p, until = self._gen_params(gen_kwargs)
            ids = self.llm.encode(context)
            prompts.append(ids[-(self.max_length - p.gen_length):] if len(ids) + p.gen_length > self.max_length
                           else ids)
            params.append(p)
            cuts.append(until)
        bar = progress(total=len(requests), desc="generate_until", unit="requests", show=None if not disable_tqdm
                       else False)
        outs = self.llm.generate(prompts, params, on_step=lambda step: bar.update(sum(o.finished for o in step)))
        bar.close()
        texts = []
        for req, out, until in zip(requests, outs, cuts, strict=True):
            text = out.text or ""
            for u in until:
                text = text.split(u, 1)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """LLaDA's Monte-Carlo estimate of log p(continuation | context), and whether greedy decoding of the
        continuation's length gives it."""
        self._full_attention("loglikelihood")
        pairs = []
        for req in requests:
            ctx, cont = self._encode_pair(*req.args)
            if not cont:
                raise ValueError(f"loglikelihood: the continuation {req.args[1]!r} encodes to no token.")
            room = self.max_length - len(cont)
            if room < 1:
                raise ValueError(f"loglikelihood: a continuation of {len(cont)} tokens leaves no room for context in "
                                 f"max_length {self.max_length}.")
            pairs.append((ctx[-room:] if ctx else ctx, cont))
        model = self.llm.model
        scores = [continuation_loglikelihood(model, ctx, cont, mc_num=self.mc_num, batch_size=self.mc_batch,
                                             seed=_seed(*req.args))
                  for req, (ctx, cont) in progress(list(zip(requests, pairs, strict=True)), desc="loglikelihood",
                                                   unit="requests", show=None if not disable_tqdm else False)]
        greedy = self._greedy(pairs) if self.check_greedy else [False] * len(pairs)
        results = list(zip(scores, greedy, strict=True))
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether greedy low-confidence decoding (one token per step) of each continuation's length gives it."""
        prompts = [ctx or [self.llm.config.eos_token_id] for ctx, _ in pairs]
        params = [SamplingParams(gen_length=len(cont), block_length=len(cont), steps=len(cont), temperature=0.0)
                  for _, cont in pairs]
        outs = self.llm.generate(prompts, params)
        return [out.token_ids == cont for out, (_, cont) in zip(outs, pairs, strict=True)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The bound of each whole text: the sum over the harness's disjoint rolling windows of ``max_length``."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        self._full_attention("loglikelihood_rolling")
        prefix = self.llm.config.eos_token_id
        results = []
        for req in progress(requests, desc="loglikelihood_rolling", unit="texts",
                            show=None if not disable_tqdm else False):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.llm.encode(text), prefix_token=prefix, max_seq_len=self.max_length, context_len=1)]
            total = sum(continuation_loglikelihood(self.llm.model, ctx, cont, mc_num=self.mc_num,
                                                   batch_size=self.mc_batch, seed=_seed(text, str(i)))
                        for i, (ctx, cont) in enumerate(windows) if cont)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return results

    # ------------------------------------------------------------------------------------------ chat
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        tok = self.llm.tokenizer
        if tok is None or not tok.has_chat_template:
            raise ValueError(f"{self.pretrained} has no chat template: run without --apply_chat_template.")
        return tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        tok = self.llm.tokenizer
        return (tok.chat_template or "") if tok is not None else ""
