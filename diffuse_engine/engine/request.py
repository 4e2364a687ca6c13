"""A request's host-side state on the engine, and what the engine returns for it.

The tokens a step reads and writes live on the model's device (:class:`~.canvas.CanvasStore`); the host keeps a
mirror of them (``Request.seq``), brought up to date from the one copy each step makes, so that every host decision
(block ends, stop strings, the final text) reads host memory and never waits for the device.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..policies.schedule import dream_timesteps, llada_transfer_counts, uses_timesteps
from ..sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (``time.perf_counter``) of a request's life, in seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    finished_time: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """The result of one request.

    ``token_ids``: the whole generated canvas (``gen_length`` tokens, prompt excluded), including the EOS
    padding that follows the answer (a model that predicts [MASK] itself can leave mask ids in it, exactly as
    the published decoding loops do; trained models do not). ``text``: the answer decoded up to the first EOS /
    end-of-turn token, with special tokens skipped (None when the engine has no tokenizer). ``nfe``: forward
    evaluations spent.
    ``finish_reason``: ``"eos"`` (the answer ended), ``"length"`` (the canvas is full without EOS), ``"stop"``
    (a stop string of ``SamplingParams.stop`` appeared; ``text`` ends before it), ``"error"`` (the request's own
    step failed, e.g. its logits were not finite; ``error`` says why, ``token_ids`` holds the canvas as it was;
    the other requests of the batch were not affected).
    ``seed``: the key of the request's randomness (give it back in SamplingParams to reproduce the output).
    ``num_revised``: committed tokens that a revision policy re-masked or replaced. ``suffix_token_ids``: the
    infilling suffix the canvas was written before (empty for a plain request).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    nfe: int
    finish_reason: str
    seed: int
    metrics: RequestMetrics
    num_revised: int = 0
    error: str | None = None
    suffix_token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.nfe if self.nfe else 0.0


class StepOutput:
    """What one engine step did to one request: ``committed`` holds (canvas position, token) pairs committed
    in this step; ``canvas`` is the canvas after the step (mask id where still masked); ``output`` is set when
    the request finished in this step. ``revised`` holds (canvas position, old token, new token) for every
    committed token a revision policy changed in this step (new token = mask id when it was re-masked); they
    happen before the step's commits. ``stable``: how many leading canvas tokens are final (no later step
    changes them: what a stream may emit). ``confidences``: each canvas position's confidence when it was
    committed (0 where masked), only for requests added with ``snapshots=True``.

    The engine keeps ``committed``, ``canvas``, ``revised`` and ``confidences`` as numpy copies and builds the
    Python lists only when they are read (no per-token Python work in a step whose outputs nobody reads);
    constructing a StepOutput with plain lists, as tests and views do, works as a dataclass would."""

    __slots__ = ("request_id", "step", "block", "finished", "output", "stable", "_committed", "_canvas",
                 "_revised", "_confidences", "_view")

    def __init__(self, request_id: str, step: int, block: int, committed: list[tuple[int, int]] | None,
                 canvas: list[int] | None, finished: bool, output: RequestOutput | None = None,
                 revised: list[tuple[int, int, int]] | None = None, stable: int = 0,
                 confidences: list[float] | None = None, *, view: _StepView | None = None) -> None:
        self.request_id, self.step, self.block, self.finished = request_id, step, block, finished
        self.output, self.stable = output, stable
        self._committed, self._canvas = committed, canvas
        self._revised = revised if revised is not None or view is not None else []
        self._confidences, self._view = confidences, view

    @property
    def committed(self) -> list[tuple[int, int]]:
        if self._committed is None:
            self._committed = self._view.committed() if self._view is not None else []
        return self._committed

    @property
    def canvas(self) -> list[int] | None:
        if self._canvas is None and self._view is not None:
            self._canvas = self._view.canvas.tolist()
        return self._canvas

    @property
    def revised(self) -> list[tuple[int, int, int]]:
        if self._revised is None:
            self._revised = self._view.revised() if self._view is not None else []
        return self._revised

    @property
    def confidences(self) -> list[float] | None:
        if self._confidences is None and self._view is not None and self._view.confidences is not None:
            self._confidences = self._view.confidences.tolist()
        return self._confidences

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepOutput):
            return NotImplemented
        names = ("request_id", "step", "block", "committed", "canvas", "finished", "output", "revised", "stable",
                 "confidences")
        return all(getattr(self, n) == getattr(other, n) for n in names)

    def __repr__(self) -> str:
        return (f"StepOutput(request_id={self.request_id!r}, step={self.step}, block={self.block}, "
                f"committed={self.committed!r}, finished={self.finished}, stable={self.stable})")


@dataclass(slots=True)
class _StepView:
    """A step's change to one request, kept as numpy arrays until a consumer asks for lists: the canvas after the
    step, and for the step's window (canvas positions ``window_lo..``) the tokens before and after and a code per
    position (1 committed, 2 revised)."""

    canvas: np.ndarray
    window_lo: int
    before: np.ndarray
    after: np.ndarray
    code: np.ndarray
    confidences: np.ndarray | None

    def committed(self) -> list[tuple[int, int]]:
        idx = np.flatnonzero(self.code == 1)
        return list(zip((idx + self.window_lo).tolist(), self.after[idx].tolist(), strict=True))

    def revised(self) -> list[tuple[int, int, int]]:
        idx = np.flatnonzero(self.code >= 2)
        return list(zip((idx + self.window_lo).tolist(), self.before[idx].tolist(), self.after[idx].tolist(),
                        strict=True))


@dataclass(slots=True)
class Request:
    """A request's host state. ``seq`` holds prompt + canvas (int64, CPU): while the request runs it is a view of the
    host mirror of its device slot (``slot``), updated after every step. ``spans`` are the diffusion blocks as [start,
    end) sequence positions: ``block_length`` each after the prompt, or, for a block-diffusion model (``block_size``
    set), the model's absolute blocks (the first one starts where the prompt ends inside its block; the last one may run
    past ``gen_length``, those extra positions are decoded and dropped). ``pages`` / ``uncond_pages``: KV-cache page
    tables (int64 numpy arrays; None without a cache). ``cached_upto``: the exact block cache holds positions [0,
    cached_upto). ``commit_conf``: each position's confidence when committed (host mirror, float32). ``reused``: leading
    positions whose K/V came from an earlier request of the conversation (never recomputed); ``retain``: keep this
    request's pages for a continuation when it finishes. ``block_masked_count``: masked positions of the current block
    after the last step. ``window_lo``: the first position the current block's steps may commit (the block start, or an
    earlier position a model left masked, without a cache). ``suffix_ids``: fixed tokens after the canvas (infilling:
    the canvas is written between the prompt and them; they are never masked and every step attends to them).
    ``status``: WAITING, RUNNING once the scheduler admits it, then FINISHED or ABORTED; ``finish_reason`` and ``error``
    are set when it finishes (as in its RequestOutput)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    remasking: str
    seed: int
    mask_id: int
    arch: str
    block_size: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    seq: torch.Tensor = field(init=False)
    spans: list[tuple[int, int]] = field(init=False)
    block: int = 0
    block_step: int = 0
    nfe: int = 0
    block_counts: list[int] = field(default_factory=list)
    timesteps: torch.Tensor | None = None
    finish_reason: str | None = None
    pages: np.ndarray | None = None
    uncond_pages: np.ndarray | None = None
    cached_upto: int = 0
    commit_conf: torch.Tensor = field(init=False)
    num_revised: int = 0
    stable: int = 0
    snapshots: bool = False
    retain: bool = False
    continue_from: str | None = None
    reused: int = 0
    slot: int | None = None
    block_masked_count: int = 0
    window_lo: int = 0
    error: str | None = None
    suffix_ids: list[int] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        p, n = len(self.prompt_ids), self.params.gen_length
        if self.block_size is None:
            bl = self.params.block_length
            self.spans = [(p + i * bl, p + (i + 1) * bl) for i in range(self.params.num_blocks)]
        else:
            b = self.block_size
            self.spans = [(max(p, j * b), (j + 1) * b) for j in range(p // b, -(-(p + n) // b))]
        length = max(p + n, self.spans[-1][1]) + len(self.suffix_ids)
        self.seq = torch.full((length,), self.mask_id, dtype=torch.int64)
        self.seq[:p] = torch.tensor(self.prompt_ids, dtype=torch.int64)
        if self.suffix_ids:
            self.seq[length - len(self.suffix_ids):] = torch.tensor(self.suffix_ids, dtype=torch.int64)
        self.commit_conf = torch.zeros(length, dtype=torch.float32)
        if uses_timesteps(self.arch, self.remasking):
            self.timesteps = dream_timesteps(self.params.steps_per_block, self.params.eps)
        self.start_block()

    @property
    def seed_bits(self) -> int:
        """The uint64 seed as the int64 with the same bits (how noise kernels take it)."""
        return self.seed - (1 << 64) if self.seed >= (1 << 63) else self.seed

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def canvas(self) -> torch.Tensor:
        return self.seq[self.prompt_len:self.prompt_len + self.params.gen_length]

    @property
    def seq_len(self) -> int:
        return self.seq.numel()

    @property
    def canvas_end(self) -> int:
        """Where the decoded positions end: the sequence's end, or the suffix's start when infilling."""
        return self.seq.numel() - len(self.suffix_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.spans)

    @property
    def block_span(self) -> tuple[int, int]:
        """[start, end) of the current block, as positions in the sequence (prompt included)."""
        return self.spans[self.block]

    @property
    def cache_mode(self) -> str:
        """``"block"`` (exact cache of a block-diffusion model), ``"prefix"``, ``"dual"`` or ``"none"``."""
        return "block" if self.block_size is not None else self.params.cache

    @property
    def refresh_step(self) -> bool:
        """Whether this step recomputes the whole sequence and refreshes a prefix / dual cache."""
        every = self.params.cache_refresh
        return self.block_step == 0 or bool(every and self.block_step % every == 0)

    @property
    def host(self) -> np.ndarray:
        """``seq`` as a numpy array (shares its memory)."""
        return self.seq.numpy()

    def window(self) -> tuple[int, int]:
        """[lo, end) of the positions the current block's steps may commit: still-masked canvas positions up to the
        end of the block. Normally these all lie in the block; a model that predicts [MASK] itself leaves a
        committed position masked, and the published loops (LLaDA scores every masked position before the block's
        end; Dream has one block) then offer it again in later steps and blocks. With a cache, only the current
        block's positions are recomputed, so only they are candidates."""
        return self.window_lo, self.block_span[1]

    def block_masked(self) -> int:
        start, end = self.block_span
        return int(np.count_nonzero(self.host[start:end] == self.mask_id))

    def start_block(self) -> None:
        """Enter the current block: LLaDA's per-step counts come from the block's own masked positions; a
        block-diffusion model's from its block size (SDAR's schedule; a first block that starts inside the
        prompt commits at most what is masked and ends when nothing is). The window starts at the block, or at the
        first position before it that is still masked when there is no cache."""
        self.block_step = 0
        self.block_masked_count = self.block_masked()
        start = self.block_span[0]
        self.window_lo = start
        if self.cache_mode == "none" and start > self.prompt_len:
            left = np.flatnonzero(self.host[self.prompt_len:start] == self.mask_id)
            if left.size:
                self.window_lo = self.prompt_len + int(left[0])
        num = self.block_size if self.block_size is not None else self.block_masked_count
        self.block_counts = llada_transfer_counts(num, self.params.steps_per_block)
