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
from ..tokenizer import Tokenizer, build_byte_tokenizer
from .tasks import Task, TextCorpus, get_task

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


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """A one-line progress bar on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None, every: int = 10) -> None:
        self.total, self.stream, self.every = total, stream or sys.stderr, every
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
                f"{elapsed:.0f}s elapsed, eta {eta:.0f}s{extra}")
        if self.tty:
            self.stream.write("\r" + line + " " * 4)
            if step == self.total:
                self.stream.write("\n")
        elif step % (self.every * 10) == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()


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
    task = get_task(cfg.task)
    preset = presets.from_name(BASE_PRESET)
    specials = preset.special_tokens
    tokenizer = Tokenizer(build_byte_tokenizer(preset.config.vocab_size, specials))
    eos_id, mask_id = preset.config.eos_token_id, preset.config.mask_token_id

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

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log = open(log_path, "w", newline="")  # noqa: SIM115 - closed in finally
    writer = csv.writer(log)
    writer.writerow(["step", "loss", "lr", "tokens_seen", "elapsed_s", "val_metric", "val_value"])
    bar = Progress(cfg.steps) if progress else None
    tokens_seen = examples_seen = 0
    ema = None
    t0 = time.perf_counter()
    val_name, val_value = "", ""
    try:
        for step in range(1, cfg.steps + 1):
            model.train()
            if stream is not None:
                examples = [next(stream) for _ in range(cfg.batch_size)]
                batch = task_batch(task, examples, tokenizer, eos_id)
            else:
                batch = text_batch(data, cfg.batch_size, cfg.seq_len, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step - 1)
            loss = diffusion_loss(model, batch, mask_id, cfg.eps, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"training diverged at step {step} (loss {value}); lower lr.")
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            tokens_seen += int(batch.ids.numel())
            examples_seen += batch.ids.shape[0]
            elapsed = time.perf_counter() - t0
            val_name, val_value = "", ""
            if step % cfg.eval_every == 0 or step == cfg.steps:
                model.eval()
                val_name, val_value = ev.validation_metric(model, tokenizer, task, cfg.eval_limit)
                if bar is not None:
                    bar.message(f"step {step}: validation {val_name} = {val_value:.4f}")
            writer.writerow([step, f"{value:.5f}", f"{lr_at(cfg, step - 1):.3g}", tokens_seen, f"{elapsed:.1f}",
                             val_name, f"{val_value:.5f}" if val_name else ""])
            if bar is not None:
                bar.update(step, ema, tokens_seen / max(elapsed, 1e-9))
    finally:
        log.close()
    wall = time.perf_counter() - t0
    model.eval().requires_grad_(False)
    save_model_folder(out, model, special_tokens=specials, chat_template=preset.chat_template,
                      bos_token=preset.bos_token, eos_token=preset.eos_token, dtype=cfg.save_dtype, overwrite=True)
    write_generation_defaults(out, task)
    metrics = (evaluate_fn or ev.final_metrics)(model, tokenizer, task, cfg.test_limit)
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


def generation_defaults(task: Task | TextCorpus) -> dict[str, Any]:
    """The SamplingParams a trained model is used with by default: its task's canvas and block size, one token
    per step, greedy, LLaDA's confidence ordering. Text: 64 characters in blocks of 16 at temperature 0.8
    (greedy decoding of a small character model collapses into runs of spaces)."""
    if isinstance(task, TextCorpus):
        return {"gen_length": 64, "block_length": 16, "steps": 64, "temperature": 0.8, "remasking": "low_confidence"}
    g, b = task.gen_length, task.block_length
    return {"gen_length": g, "block_length": b, "steps": g, "temperature": 0.0, "remasking": "low_confidence"}


def write_generation_defaults(folder: str | Path, task: Task | TextCorpus) -> Path:
    from ..loader import GENERATION_DEFAULTS_FILE

    path = Path(folder) / GENERATION_DEFAULTS_FILE
    path.write_text(json.dumps(generation_defaults(task), indent=2) + "\n")
    return path


def data_sizes(task: Task | TextCorpus) -> dict[str, Any]:
    if isinstance(task, TextCorpus):
        return {"train_chars": len(task.train_text()), "held_out_chars": len(task.held_out_text()),
                "train_topics": len(task.train_topics()), "held_out_topics": task.held_out_topics()}
    return {"test_examples": len(task.test_set()), "validation_examples": len(task.validation_set()),
            "gen_length": task.gen_length, "block_length": task.block_length}


def model_card(summary: dict[str, Any]) -> str:
    """The README of a trained checkpoint: how it was made and what it reaches."""
    cfg = summary["config"]
    task = get_task(cfg["task"])
    m = summary["metrics"]
    lines = [f"# {cfg['task']}: a tiny LLaDA-style masked-diffusion model", "",
             f"{task.description}.", "",
             "## How it was trained", "",
             f"    {summary['command']}", "",
             f"- LLaDA architecture, byte-level vocabulary of 320: hidden {cfg['hidden_size']}, "
             f"{cfg['num_layers']} layers, {cfg['num_heads']} heads, MLP {cfg['intermediate_size']} "
             f"({summary['parameters']:,} parameters), weights stored in {cfg['save_dtype']}.",
             f"- {cfg['steps']} steps of batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, "
             f"cosine to {cfg['min_lr_ratio']}x), weight decay {cfg['weight_decay']}, seed {cfg['seed']}.",
             f"- Wall time {summary['wall_s']:.0f} s on the CPU (torch threads: {summary['threads']}, torch "
             f"{summary['torch']}); {summary['tokens_seen']:,} tokens, {summary['examples_seen']:,} sequences; "
             f"final loss (EMA) {summary['final_loss_ema']:.4f}.",
             f"- Data: {json.dumps(summary['data'])}.", "",
             "## Results (held-out test data)", ""]
    for key, value in m.items():
        if key == "samples":
            continue
        lines.append(f"- {key}: {value}")
    if m.get("samples"):
        lines += ["", "## Samples", ""]
        for s in m["samples"]:
            lines += [f"Prompt: `{s['prompt']!r}` ({s.get('params', '')})", "", "Output:", "", "```", s["output"],
                      "```", ""]
    lines += ["", "Files: `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` (the LLaDA "
              "Hugging Face layout the engine loads), `generation_defaults.json` (the SamplingParams used when none "
              "are given), `training.json` (this summary as data), `train_log.csv` (loss per step, validation "
              "metric every few hundred steps).", ""]
    return "\n".join(lines)
