"""A request's state on the engine, and what the engine returns for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams
from .schedule import dream_timesteps, llada_transfer_counts


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
    (a stop string of ``SamplingParams.stop`` appeared; ``text`` ends before it).
    ``seed``: the key of the request's randomness (give it back in SamplingParams to reproduce the output).
    ``num_revised``: committed tokens that a revision policy re-masked or replaced.
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

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.nfe if self.nfe else 0.0


@dataclass(slots=True)
class StepOutput:
    """What one engine step did to one request: ``committed`` holds (canvas position, token) pairs committed
    in this step; ``canvas`` is the canvas after the step (mask id where still masked); ``output`` is set when
    the request finished in this step. ``revised`` holds (canvas position, old token, new token) for every
    committed token a revision policy changed in this step (new token = mask id when it was re-masked); they
    happen before the step's commits. ``stable``: how many leading canvas tokens are final (no later step
    changes them: what a stream may emit). ``confidences``: each canvas position's confidence when it was
    committed (0 where masked), only for requests added with ``snapshots=True``."""

    request_id: str
    step: int
    block: int
    committed: list[tuple[int, int]]
    canvas: list[int]
    finished: bool
    output: RequestOutput | None = None
    revised: list[tuple[int, int, int]] = field(default_factory=list)
    stable: int = 0
    confidences: list[float] | None = None


@dataclass(slots=True)
class Request:
    """A request's state. ``seq`` holds prompt + canvas (int64, CPU). ``spans`` are the diffusion blocks as
    [start, end) sequence positions: ``block_length`` each after the prompt, or, for a block-diffusion model
    (``block_size`` set), the model's absolute blocks (the first one starts where the prompt ends inside its
    block; the last one may run past ``gen_length``, those extra positions are decoded and dropped).
    ``pages`` / ``uncond_pages``: KV-cache page tables (None without a cache). ``cached_upto``: the exact block
    cache holds positions [0, cached_upto). ``commit_conf``: each position's confidence when committed.
    ``reused``: leading positions whose K/V came from an earlier request of the conversation (never
    recomputed); ``retain``: keep this request's pages for a continuation when it finishes."""

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
    pages: torch.Tensor | None = None
    uncond_pages: torch.Tensor | None = None
    cached_upto: int = 0
    commit_conf: torch.Tensor = field(init=False)
    num_revised: int = 0
    stable: int = 0
    snapshots: bool = False
    retain: bool = False
    continue_from: str | None = None
    reused: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        p, n = len(self.prompt_ids), self.params.gen_length
        if self.block_size is None:
            bl = self.params.block_length
            self.spans = [(p + i * bl, p + (i + 1) * bl) for i in range(self.params.num_blocks)]
        else:
            b = self.block_size
            self.spans = [(max(p, j * b), (j + 1) * b) for j in range(p // b, -(-(p + n) // b))]
        length = max(p + n, self.spans[-1][1])
        self.seq = torch.full((length,), self.mask_id, dtype=torch.int64)
        self.seq[:p] = torch.tensor(self.prompt_ids, dtype=torch.int64)
        self.commit_conf = torch.zeros(length, dtype=torch.float32)
        if self.arch == "dream" or self.remasking == "origin":
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

    def candidates(self) -> torch.Tensor:
        """Sequence positions a step may commit, ascending: every still-masked canvas position up to the end of
        the current block. Normally these all lie in the current block; a model that predicts [MASK] itself
        leaves a committed position masked, and the published loops (LLaDA scores every masked position
        before the block's end; Dream has one block) then offer it again in later steps and blocks. With a
        cache, only the current block's positions are recomputed, so only they are candidates."""
        start, end = self.block_span
        lo = self.prompt_len if self.cache_mode == "none" else start
        return (self.seq[lo:end] == self.mask_id).nonzero().squeeze(1) + lo

    def block_masked(self) -> int:
        start, end = self.block_span
        return int((self.seq[start:end] == self.mask_id).sum())

    def start_block(self) -> None:
        """Enter the current block: LLaDA's per-step counts come from the block's own masked positions; a
        block-diffusion model's from its block size (SDAR's schedule; a first block that starts inside the
        prompt commits at most what is masked and ends when nothing is)."""
        self.block_step = 0
        num = self.block_size if self.block_size is not None else self.block_masked()
        self.block_counts = llada_transfer_counts(num, self.params.steps_per_block)
