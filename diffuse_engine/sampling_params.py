"""Per-request decoding settings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .policies import DECODING, ORDERINGS, REVISION, Names, default_ordering
from .policies.ordering import confidence_orderings

# The names each choice accepts are those of the registries (diffuse_engine.policies), read when a value is checked:
# a registered policy is selectable. The views below stay importable as the lists of names.
# Confidence orderings: which masked positions a step commits first (policies/ordering.py).
REMASKING = Names(ORDERINGS)
# KV caches (block-diffusion models always use their exact block cache, whatever this says).
CACHES = ("none", "prefix", "dual")
# Decoding policies: how many of a step's ranked candidates are committed.
POLICIES = Names(DECODING)
# Revision policies: how committed tokens of the current block are revised.
REVISIONS = Names(REVISION)
REMDM_VARIANTS = ("cap", "rescale", "conf")

# Bounds of the numeric fields. Every value inside them keeps a step's arithmetic finite in fp32 for finite logits
# (the published models use cfg_scale <= 3, factor ~1 and temperatures <= 2; the bounds leave wide room).
MAX_GEN_LENGTH = 1 << 20
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
MAX_CFG_SCALE = 100.0
MAX_FACTOR = 1000.0
MAX_EB_GAMMA = 1e4
MAX_STOP_CHARS = 1024


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request is decoded. Immutable: derive a variant with ``dataclasses.replace(params, steps=...)``
    (which validates it again); the engine validates it once more when a request is added.

    The canvas of ``gen_length`` [MASK] tokens is cut into ``gen_length / block_length`` blocks decoded left to
    right, each in ``steps / num_blocks`` denoising steps (one forward each). The number of tokens committed
    per step follows the model family's published schedule: LLaDA commits ``masked // steps`` per step (the
    remainder in the first steps); Dream commits ``int(n * (1 - s / t))`` of the ``n`` still-masked positions
    over ``linspace(1, eps, steps + 1)``, and all that remain at the last step.

    Attributes:
        gen_length: tokens to generate.
        block_length: diffusion block size; must divide ``gen_length``. None: one block of ``gen_length``.
        steps: denoising steps over all blocks; a multiple of the number of blocks, at most ``gen_length``.
            None: ``gen_length`` (one token per step).
        temperature: 0 is greedy; > 0 samples from ``softmax(logits / temperature)`` (Gumbel-max).
        remasking: the confidence ordering, one of :data:`REMASKING`. None: the family's default
            (``low_confidence`` for LLaDA and SDAR, ``maskgit_plus`` for Dream).
        alg_temp: Dream's position temperature: when > 0 the positions to commit are sampled without
            replacement from ``softmax(confidence / alg_temp)`` instead of taken greedily. Only for the
            confidence orderings (not ``random`` / ``origin``).
        top_p: nucleus filter in (0, 1] applied before sampling and scoring (Dream's convention).
        top_k: keep the k largest logits before sampling and scoring.
        cfg_scale: classifier-free guidance (LLaDA): ``un + (cfg_scale + 1) * (cond - un)`` where the
            unconditional input has the prompt replaced by [MASK]. 0 disables it.
        logits_eos_inf: LLaDA's option: the EOS logit is set to -inf, so EOS is never predicted.
        confidence_eos_eot_inf: LLaDA's option, with its published semantics: after sampling, the end-of-turn
            logit (and, at temperature 0, also the EOS logit, because the published code then aliases the noisy
            and the raw logits) is set to -inf in the softmax that scores confidence, so such a predicted token
            gets confidence 0 and is committed last.
        early_stop: finish once a completed block contains EOS or end-of-turn; the blocks after it are filled
            with EOS without spending their steps.
        eps: Dream's final timestep (the schedule runs from 1 down to eps).
        seed: key of the request's counter-based randomness; None draws one (reported in the output).
        cache: ``"none"`` (every step recomputes the whole sequence), ``"prefix"`` (the K/V of everything before
            the current block are computed at the block's first step and reused; each step recomputes the block
            and what follows it), ``"dual"`` (the K/V of the prefix and of the suffix after the block are
            reused; each step recomputes only the block). Block-diffusion models always use their exact cache
            of finished blocks, whatever this says.
        cache_refresh: with ``"dual"`` / ``"prefix"``: recompute the whole sequence (and refresh the cache)
            every ``cache_refresh`` steps of a block as well as at its start. None: only at the block start.
        policy: how many ranked candidates a step commits: ``"fixed"`` (the family's schedule over
            ``steps``), ``"threshold"`` (every candidate whose confidence >= ``threshold``, at least the best:
            Fast-dLLM), ``"factor"`` (Fast-dLLM's factor rule with ``factor``), ``"eb"`` (EB-sampler: in order of
            confidence while the summed entropy minus its largest term stays <= ``eb_gamma``). The adaptive
            policies ignore ``steps``: a block takes as many steps as it needs (at most ``2 * block_length``).
            Their confidence is the ordering's score: the sampled token's probability (``low_confidence``,
            ``maskgit_plus``, ``random``, ``origin``), the top-1 - top-2 margin (``topk_margin``) or
            ``exp(-entropy)`` (``entropy``).
        threshold, factor, eb_gamma: the parameters of those policies.
        revision: None, or how committed tokens of the current block are revised: ``"remdm"`` (ReMDM: each is
            re-masked with probability sigma_t, by ``remdm_variant`` ``"cap"`` min(eta, sigma_max),
            ``"rescale"`` eta * sigma_max or ``"conf"`` eta * sigma_max spread by softmax(-commit confidence)),
            ``"wino"`` (re-mask a token whose verification probability falls below ``verify_threshold``; pair it
            with ``policy="threshold"`` and a low ``threshold`` for WINO's wide-in narrow-out), ``"edit"``
            (replace a token when another token's verification probability beats it by ``edit_margin``).
            Verification scores a committed token with its own position hidden (leave-one-out queries in the
            same forward). Revision stops in a block's last scheduled step (fixed policy) or after
            ``block_length`` steps (adaptive policies), so every block finishes.
        remdm_variant, remdm_eta, verify_threshold, edit_margin: the parameters of the revisions.
        stop: strings that end the answer (e.g. a tool-call marker): once the final part of the canvas (finished
            blocks, and the committed start of the current block when no revision can change it) contains one,
            the request finishes with ``finish_reason="stop"``, its text cut before the string, and the
            remaining blocks are not decoded. Needs the engine's tokenizer.
    """

    gen_length: int = 128
    block_length: int | None = None
    steps: int | None = None
    temperature: float = 0.0
    remasking: str | None = None
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    early_stop: bool = False
    eps: float = 1e-3
    seed: int | None = None
    cache: str = "none"
    cache_refresh: int | None = None
    policy: str = "fixed"
    threshold: float = 0.9
    factor: float = 1.0
    eb_gamma: float = 0.01
    revision: str | None = None
    remdm_variant: str = "cap"
    remdm_eta: float = 0.05
    verify_threshold: float = 0.9
    edit_margin: float = 0.2
    stop: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Normalise the defaults that depend on other fields, then check every field.
        if self.block_length is None:
            object.__setattr__(self, "block_length", self.gen_length if _is_int(self.gen_length) else None)
        if self.steps is None:
            object.__setattr__(self, "steps", self.gen_length if _is_int(self.gen_length) else None)
        if self.stop is not None:
            stop = [self.stop] if isinstance(self.stop, str) else self.stop
            if isinstance(stop, (list, tuple)):
                object.__setattr__(self, "stop", tuple(stop))
        self.validate()

    def validate(self) -> None:
        """Check every field (raises ValueError naming the first bad one). Runs at construction and again when
        the engine accepts a request, so a value forced past the frozen dataclass cannot reach a step."""
        _int("gen_length", self.gen_length, minimum=1, maximum=MAX_GEN_LENGTH)
        _int("block_length", self.block_length, minimum=1)
        if self.gen_length % self.block_length:
            raise ValueError(f"block_length ({self.block_length}) must divide gen_length ({self.gen_length}).")
        _int("steps", self.steps, minimum=1)
        if self.steps > self.gen_length:
            raise ValueError(f"steps ({self.steps}) must not exceed gen_length ({self.gen_length}): a step commits "
                             f"at least one token.")
        if self.steps % self.num_blocks:
            raise ValueError(f"steps ({self.steps}) must be divisible by the number of blocks "
                             f"(gen_length / block_length = {self.num_blocks}).")
        _temperature("temperature", self.temperature)
        if self.remasking is not None and self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING)}; got {self.remasking!r}.")
        if self.alg_temp is not None:
            _temperature("alg_temp", self.alg_temp)
            if self.alg_temp > 0 and self.remasking is not None and not ORDERINGS[self.remasking].ranks_confidence:
                raise ValueError(f"alg_temp applies to the confidence orderings {', '.join(confidence_orderings())}; "
                                 f"it has no effect with remasking={self.remasking!r}.")
        if self.top_p is not None:
            _float("top_p", self.top_p)
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}.")
        if self.top_k is not None:
            _int("top_k", self.top_k, minimum=1, maximum=2 ** 31 - 1)
        _float("cfg_scale", self.cfg_scale, minimum=0.0, maximum=MAX_CFG_SCALE)
        _float("eps", self.eps)
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1); got {self.eps!r}.")
        for name in ("logits_eos_inf", "confidence_eos_eot_inf", "early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}.")
        if self.seed is not None:
            _int("seed", self.seed, minimum=0)
            if self.seed >= 2 ** 64:
                raise ValueError(f"seed must be below 2**64; got {self.seed}.")
        _choice("cache", self.cache, CACHES)
        if self.cache_refresh is not None:
            _int("cache_refresh", self.cache_refresh, minimum=1, maximum=MAX_GEN_LENGTH)
        _choice("policy", self.policy, POLICIES)
        _float("threshold", self.threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {self.threshold!r}.")
        _float("factor", self.factor, maximum=MAX_FACTOR)
        if self.factor <= 0:
            raise ValueError(f"factor must be positive; got {self.factor!r}.")
        _float("eb_gamma", self.eb_gamma, minimum=0.0, maximum=MAX_EB_GAMMA)
        if self.revision is not None:
            _choice("revision", self.revision, REVISIONS)
        _choice("remdm_variant", self.remdm_variant, REMDM_VARIANTS)
        _float("remdm_eta", self.remdm_eta)
        if not 0.0 <= self.remdm_eta <= 1.0:
            raise ValueError(f"remdm_eta must be in [0, 1]; got {self.remdm_eta!r}.")
        _float("verify_threshold", self.verify_threshold)
        if not 0.0 <= self.verify_threshold <= 1.0:
            raise ValueError(f"verify_threshold must be in [0, 1]; got {self.verify_threshold!r}.")
        if self.stop is not None:
            if not isinstance(self.stop, tuple) or not all(isinstance(x, str) and x for x in self.stop):
                raise ValueError(f"stop must be a list of non-empty strings; got {self.stop!r}.")
            if len(self.stop) > 16:
                raise ValueError(f"stop takes at most 16 strings; got {len(self.stop)}.")
            if any(len(x) > MAX_STOP_CHARS for x in self.stop):
                raise ValueError(f"each stop string is at most {MAX_STOP_CHARS} characters long.")
        _float("edit_margin", self.edit_margin)
        if not 0.0 <= self.edit_margin <= 1.0:
            raise ValueError(f"edit_margin must be in [0, 1]; got {self.edit_margin!r}.")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def adaptive(self) -> bool:
        """Whether a block's number of steps depends on the model's confidence (not ``fixed``)."""
        return DECODING[self.policy].adaptive

    def resolved_remasking(self, arch: str) -> str:
        """The confidence ordering: ``remasking``, or the family's default (:func:`policies.default_ordering`)."""
        return self.remasking if self.remasking is not None else default_ordering(arch)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}.")


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _float(name: str, value: object, minimum: float | None = None, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}; got {value!r}.")


def _temperature(name: str, value: object) -> None:
    """0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: below the floor, logits / T overflows the float range
    of the head (a request would only fail at its first step)."""
    _float(name, value, minimum=0.0, maximum=MAX_TEMPERATURE)
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be 0 (greedy) or >= {MIN_TEMPERATURE:g}; got {value!r}.")


def read_generation_defaults(folder: str | Path) -> dict[str, Any]:
    """The SamplingParams fields stored in the folder's ``generation_defaults.json`` ({} when absent).
    Unknown fields or invalid values raise CheckpointError."""
    from .loader import GENERATION_DEFAULTS_FILE, read_json_file

    path = Path(folder) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return {}
    data = read_json_file(path)
    name = GENERATION_DEFAULTS_FILE
    if not isinstance(data, dict):
        raise CheckpointError(f"{name} must hold a JSON object of SamplingParams fields.")
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{name} has fields that SamplingParams does not know: {', '.join(unknown)}.")
    try:
        SamplingParams(**data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name} holds invalid sampling parameters: {exc}") from None
    return data
