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
    ``finish_reason``: ``"eos"`` (the answer ended), ``"length"`` (the canvas is full without EOS).
    ``seed``: the key of the request's randomness (give it back in SamplingParams to reproduce the output).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    nfe: int
    finish_reason: str
    seed: int
    metrics: RequestMetrics

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.nfe if self.nfe else 0.0


@dataclass(slots=True)
class StepOutput:
    """What one engine step did to one request: ``committed`` holds (canvas position, token) pairs committed
    in this step; ``canvas`` is the canvas after the step (mask id where still masked); ``output`` is set when
    the request finished in this step."""

    request_id: str
    step: int
    block: int
    committed: list[tuple[int, int]]
    canvas: list[int]
    finished: bool
    output: RequestOutput | None = None


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    remasking: str
    seed: int
    mask_id: int
    arch: str
    status: RequestStatus = RequestStatus.WAITING
    seq: torch.Tensor = field(init=False)  # prompt + canvas, int64, CPU
    block: int = 0
    block_step: int = 0
    nfe: int = 0
    block_counts: list[int] = field(default_factory=list)
    timesteps: torch.Tensor | None = None
    finish_reason: str | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        self.seq = torch.full((len(self.prompt_ids) + self.params.gen_length,), self.mask_id, dtype=torch.int64)
        self.seq[: len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.int64)
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
        return self.seq[self.prompt_len:]

    @property
    def seq_len(self) -> int:
        return self.seq.numel()

    @property
    def block_span(self) -> tuple[int, int]:
        """[start, end) of the current block, as positions in the sequence (prompt included)."""
        start = self.prompt_len + self.block * self.params.block_length
        return start, start + self.params.block_length

    def candidates(self) -> torch.Tensor:
        """Sequence positions a step may commit, ascending: every still-masked canvas position up to the end of
        the current block. Normally these all lie in the current block; a model that predicts [MASK] itself
        leaves a committed position masked, and the published loops (LLaDA scores every masked position
        before the block's end; Dream has one block) then offer it again in later steps and blocks."""
        _, end = self.block_span
        return (self.seq[self.prompt_len:end] == self.mask_id).nonzero().squeeze(1) + self.prompt_len

    def start_block(self) -> None:
        """Enter the current block: LLaDA's per-step counts come from the block's own masked positions."""
        self.block_step = 0
        start, end = self.block_span
        num_masked = int((self.seq[start:end] == self.mask_id).sum())
        self.block_counts = llada_transfer_counts(num_masked, self.params.steps_per_block)
