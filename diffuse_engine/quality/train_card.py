"""What a training run writes next to the weights: the sampling defaults of the trained model
(``generation_defaults.json``), the sizes of its data and its model card (``README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tasks import Task, TextCorpus, get_task


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
