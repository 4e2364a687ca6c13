"""Training of small masked-diffusion models on the CPU (LLaDA's objective), written as engine checkpoints.

Objective (LLaDA): per sequence draw t ~ U(0, 1), mask each trainable position with probability
p = (1 - eps) t + eps, and minimise the cross-entropy of the masked positions weighted by 1/p (an upper bound
on the negative log-likelihood). For prompt -> answer tasks the prompt is never masked and the answer is padded
with EOS to the task's canvas length (LLaDA's supervised fine-tuning form; the loss is normalised by that
length); for the text corpus every position of a random window is trainable.

Deterministic given the seed and the thread count: data come from ``random.Random(seed)`` and a
``torch.Generator`` seeded from it, and the model is initialised from the seed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import presets
from ..checkpoint import save_model_folder
from ..config import ModelConfig
from ..models import DiffusionLM, build_model
from ..progress import Progress
from ..tokenizer import Tokenizer, build_byte_tokenizer
from .tasks import Task, TextCorpus, get_task
from .train_card import data_sizes, model_card, write_generation_defaults

BASE_PRESET = "llada-tiny"  # byte-level vocabulary of 320 with LLaDA's special tokens at 256+
LOG_FILE = "train_log.csv"
SUMMARY_FILE = "training.json"
CARD_FILE = "README.md"


@dataclass
class TrainConfig:
    """Everything that defines a training run (written next to the checkpoint)."""

    task: str
    out: str
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eps: float = 1e-3
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    seq_len: int = 128  # text corpus windows
    eval_every: int = 500
    eval_limit: int = 128
    test_limit: int | None = None  # final evaluation: the whole test set by default
    threads: int | None = None
    save_dtype: str = "float32"
    overwrite: bool = False

    def validate(self) -> None:
        positive = ("steps", "batch_size", "warmup", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "seq_len", "eval_every", "eval_limit")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}).")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1].")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}.")
        get_task(self.task)  # raises on an unknown task


def model_config(cfg: TrainConfig, max_len: int) -> ModelConfig:
    base = presets.from_name(BASE_PRESET).config
    return dataclasses.replace(base, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                               num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                               intermediate_size=cfg.intermediate_size, max_position_embeddings=max_len)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Token ids ``[B, T]``, which positions are trainable (may be masked), which are real (attended)."""

    ids: torch.Tensor
    trainable: torch.Tensor
    attended: torch.Tensor | None
    norm: float  # the loss is divided by this (B x trainable length)


def task_batch(task: Task, examples: Sequence, tokenizer: Tokenizer, eos_id: int) -> Batch:
    """Prompt + answer + EOS padding to ``task.gen_length``; rows right-padded (unattended) to the longest."""
    g = task.gen_length
    rows = []
    for ex in examples:
        prompt, answer = tokenizer.encode(ex.prompt), tokenizer.encode(ex.answer)
        if len(answer) > g:
            raise ValueError(f"answer {ex.answer!r} is longer than the canvas of task {task.name!r} ({g}).")
        rows.append((prompt, answer + [eos_id] * (g - len(answer))))
    t = max(len(p) for p, _ in rows) + g
    ids = torch.full((len(rows), t), eos_id, dtype=torch.long)
    trainable = torch.zeros((len(rows), t), dtype=torch.bool)
    attended = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p)] = torch.tensor(p)
        ids[i, len(p):len(p) + g] = torch.tensor(a)
        trainable[i, len(p):len(p) + g] = True
        attended[i, :len(p) + g] = True
    return Batch(ids, trainable, None if bool(attended.all()) else attended, float(len(rows) * g))


def text_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
    ids = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
    return Batch(ids, torch.ones_like(ids, dtype=torch.bool), None, float(batch_size * seq_len))


def sample_mask(batch: Batch, eps: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ``[B, T]`` bool, p ``[B]``): per row t ~ U(0, 1), p = (1 - eps) t + eps, and each trainable
    position masked independently with probability p; positions that are not trainable never are."""
    b, t = batch.ids.shape
    p = (1 - eps) * torch.rand(b, generator=gen) + eps
    masked = (torch.rand(b, t, generator=gen) < p[:, None]) & batch.trainable
    return masked, p


def diffusion_loss(model: DiffusionLM, batch: Batch, mask_id: int, eps: float, gen: torch.Generator) -> torch.Tensor:
    """LLaDA's masked-diffusion loss of one batch: sum over masked positions of cross-entropy / p, divided by
    ``batch.norm`` (rows x trainable length)."""
    masked, p = sample_mask(batch, eps, gen)
    noisy = torch.where(masked, torch.full_like(batch.ids, mask_id), batch.ids)
    logits = model(noisy, attention_mask=batch.attended)
    ce = F.cross_entropy(logits[masked].float(), batch.ids[masked], reduction="none")
    weights = (1.0 / p)[:, None].expand_as(masked)[masked]
    return (ce * weights).sum() / batch.norm


# --------------------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    folder: Path
    steps: int
    wall_s: float
    tokens_seen: int
    examples_seen: int
    final_loss: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Setup:
    """What a training run works with, made from the config and its seed (in this order: data, model, optimiser)."""
    task: Task | TextCorpus
    preset: Any
    tokenizer: Tokenizer
    gen: torch.Generator
    data: torch.Tensor | None
    stream: Any
    model: DiffusionLM
    opt: torch.optim.Optimizer


def _setup(cfg: TrainConfig) -> _Setup:
    task = get_task(cfg.task)
    preset = presets.from_name(BASE_PRESET)
    tokenizer = Tokenizer(build_byte_tokenizer(preset.config.vocab_size, preset.special_tokens))
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    if isinstance(task, TextCorpus):
        data = torch.tensor(tokenizer.encode(task.train_text()), dtype=torch.long)
        max_len = max(512, cfg.seq_len)
        stream = None
    else:
        data = None
        max_len = 512
        stream = task.train_stream(rng.getrandbits(63))
    mcfg = model_config(cfg, max_len)
    torch.manual_seed(rng.getrandbits(63))
    model = build_model(mcfg, dtype=torch.float32).init_random_(rng.getrandbits(31)).requires_grad_(True)
    _init_for_training_(model, torch.Generator().manual_seed(rng.getrandbits(63)))
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    return _Setup(task, preset, tokenizer, gen, data, stream, model, opt)


def _step(cfg: TrainConfig, s: _Setup, step: int) -> tuple[float, Batch]:
    """One optimiser step; returns its loss and batch."""
    s.model.train()
    if s.stream is not None:
        examples = [next(s.stream) for _ in range(cfg.batch_size)]
        batch = task_batch(s.task, examples, s.tokenizer, s.preset.config.eos_token_id)
    else:
        batch = text_batch(s.data, cfg.batch_size, cfg.seq_len, s.gen)
    for group in s.opt.param_groups:
        group["lr"] = lr_at(cfg, step - 1)
    loss = diffusion_loss(s.model, batch, s.preset.config.mask_token_id, cfg.eps, s.gen)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    s.opt.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(f"training diverged at step {step} (loss {value}); lower lr.")
    return value, batch


def _run_steps(cfg: TrainConfig, s: _Setup, log_path: Path, progress: bool, validate: Callable) -> tuple:
    """Every step, logged to ``log_path`` (with the validation metric every ``eval_every`` steps); returns
    (loss EMA, tokens seen, sequences seen, seconds)."""
    bar = Progress("train", "steps", total=cfg.steps, enabled=progress)
    tokens_seen = examples_seen = 0
    ema = None
    with open(log_path, "w", newline="") as log:
        writer = csv.writer(log)
        writer.writerow(["step", "loss", "lr", "tokens_seen", "elapsed_s", "val_metric", "val_value"])
        t0 = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            value, batch = _step(cfg, s, step)
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            tokens_seen += int(batch.ids.numel())
            examples_seen += batch.ids.shape[0]
            elapsed = time.perf_counter() - t0
            val_name, val_value = "", ""
            if step % cfg.eval_every == 0 or step == cfg.steps:
                s.model.eval()
                val_name, val_value = validate(s.model, s.tokenizer, s.task, cfg.eval_limit)
                bar.message(f"step {step}: validation {val_name} = {val_value:.4f}")
            writer.writerow([step, f"{value:.5f}", f"{lr_at(cfg, step - 1):.3g}", tokens_seen, f"{elapsed:.1f}",
                             val_name, f"{val_value:.5f}" if val_name else ""])
            bar.set_postfix_str(f"loss {ema:.4f}, {tokens_seen / max(elapsed, 1e-9):,.0f} tok/s")
            bar(step)
    bar.close()
    return ema, tokens_seen, examples_seen, time.perf_counter() - t0


def train(cfg: TrainConfig, *, command: str | None = None, progress: bool = True,
          evaluate_fn: Callable[..., dict[str, Any]] | None = None) -> TrainResult:
    """Train a model for ``cfg`` and write it (with ``train_log.csv``, ``training.json`` and a model card) to
    ``cfg.out``. ``command`` is recorded in the card (default: this process's command line)."""
    from . import evaluate as ev

    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"output folder {out} is not empty; pass overwrite to replace the checkpoint in it.")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    s = _setup(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ema, tokens_seen, examples_seen, wall = _run_steps(cfg, s, out / LOG_FILE, progress, ev.validation_metric)
    model, task, preset = s.model.eval().requires_grad_(False), s.task, s.preset
    save_model_folder(out, model, special_tokens=preset.special_tokens, chat_template=preset.chat_template,
                      bos_token=preset.bos_token, eos_token=preset.eos_token, dtype=cfg.save_dtype, overwrite=True)
    write_generation_defaults(out, task)
    metrics = (evaluate_fn or ev.final_metrics)(model, s.tokenizer, task, cfg.test_limit)
    result = TrainResult(out, cfg.steps, wall, tokens_seen, examples_seen, ema or float("nan"), metrics)
    summary = {"config": dataclasses.asdict(cfg), "command": command or " ".join(["diffuse-engine", *sys.argv[1:]]),
               "wall_s": round(wall, 1), "tokens_seen": tokens_seen, "examples_seen": examples_seen,
               "final_loss_ema": round(result.final_loss, 5), "parameters": sum(p.numel() for p in model.parameters()),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "data": data_sizes(task),
               "metrics": metrics}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(summary))
    return result


@torch.no_grad()
def _init_for_training_(model: DiffusionLM, gen: torch.Generator) -> None:
    """A conventional small-model initialisation: N(0, 0.02) weights, output projections scaled by
    1/sqrt(2 layers) (GPT-2), unit norms."""
    scale = 0.02 / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        std = scale if name.endswith(("attn_out.weight", ".ff_out.weight", "o_proj.weight", "down_proj.weight")) \
            else 0.02
        p.copy_(torch.randn(p.shape, generator=gen) * std)
