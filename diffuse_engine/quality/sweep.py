"""The quality-vs-speed sweep: policies x steps x block sizes on one task, as CSV rows and PNG plots (accuracy vs
NFE and accuracy vs seconds, one curve per policy and block size)."""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..entrypoints.llm import LLM
from ..sampling_params import CACHES
from .evaluate import KNOBS, POLICIES, evaluate_task
from .tasks import Task, TextCorpus

CSV_FIELDS = ["date", "commit", "model", "task", "policy", "cache", "knob", "block_length", "steps", "gen_length", "n",
              "accuracy", "nfe", "tokens_per_forward", "tokens_per_s", "wall_s", "device", "dtype", "threads",
              "command"]


def default_steps(gen_length: int, block_length: int) -> list[int]:
    """Step counts from one token per step down to one step per block, halving (each a multiple of the
    number of blocks)."""
    blocks = gen_length // block_length
    out, steps = [], gen_length
    while steps >= blocks:
        if steps % blocks == 0:
            out.append(steps)
        if steps == blocks:
            break
        steps = max(blocks, steps // 2)
    return out


def default_block_lengths(gen_length: int) -> list[int]:
    """The whole canvas as one block, and half of it when that divides evenly."""
    return [gen_length] + ([gen_length // 2] if gen_length % 2 == 0 and gen_length >= 4 else [])


def run_sweep(llm: LLM, task: Task, *, model_name: str, policies: Sequence[str] | None = None,
              steps: Sequence[int] | None = None, block_lengths: Sequence[int] | None = None,
              caches: Sequence[str] = ("none",), limit: int | None = 200, command: str = "",
              progress=None, on_setting=None) -> list[dict[str, Any]]:
    """Evaluate every (cache, policy, block length, steps) combination that the engine accepts; returns CSV rows.
    A combination whose steps are not a multiple of its number of blocks is skipped. Adaptive policies
    (:data:`KNOBS`) run once per value of their parameter instead of once per step count (``knob`` column).
    ``progress(row)`` sees each row as it is measured; ``on_setting(done, total)`` counts the settings."""
    for c in caches:
        if c not in CACHES:
            raise ValueError(f"unknown cache {c!r}; available: {', '.join(CACHES)}.")
    if isinstance(task, TextCorpus):
        raise ValueError(f"{task.name!r} is a text corpus: the sweep needs a task with a checker.")
    policies = list(policies or POLICIES)
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; available: {', '.join(POLICIES)}.")
    g = task.gen_length
    block_lengths = list(block_lengths or default_block_lengths(g))
    for b in block_lengths:
        if b < 1 or g % b:
            raise ValueError(f"block length {b} must divide the task's gen_length {g}.")
    if steps is not None:
        for s in steps:
            if s < 1 or s > g:
                raise ValueError(f"steps {s} must be between 1 and the task's gen_length {g}.")
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(),
             "device": device_name(llm.model.device), "dtype": str(llm.model.dtype).removeprefix("torch."),
             "threads": torch.get_num_threads(), "command": command, "model": model_name}
    plan = []
    for block in block_lengths:
        blocks = g // block
        grid = [s for s in (steps or default_steps(g, block)) if s % blocks == 0 and s >= blocks]
        for cache in caches:
            for policy in policies:
                if policy in KNOBS:
                    name, values = KNOBS[policy]
                    points = [(g, {name: v}, f"{name}={v:g}") for v in values]
                else:
                    points = [(s, {}, "") for s in grid]
                plan += [(block, cache, policy, s, extra, knob) for s, extra, knob in points]
    if not plan:
        raise ValueError("no (policy, block length, steps) combination is valid for this task.")
    rows = []
    for block, cache, policy, s, extra, knob in plan:
        r = evaluate_task(llm, task, policy, steps=s, block_length=block, limit=limit, cache=cache, **extra)
        row = {**stamp, "task": task.name, "policy": policy, "cache": cache, "knob": knob,
               "block_length": block, "steps": s if not knob else "", "gen_length": g, "n": r.n,
               "accuracy": round(r.accuracy, 4), "nfe": round(r.nfe, 3),
               "tokens_per_forward": round(r.tokens_per_forward, 3),
               "tokens_per_s": round(r.tokens_per_s, 1), "wall_s": round(r.wall_s, 3)}
        rows.append(row)
        if progress is not None:
            progress(row)
        if on_setting is not None:
            on_setting(len(rows), len(plan))
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict[str, Any]], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>_nfe.png`` and ``<stem>_seconds.png``: accuracy against mean NFE and against wall seconds, one
    panel per (cache, block length), one curve per policy (the legend below the panels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the sweep's plots need matplotlib: pip install matplotlib "
                           "(or diffuse-engine[eval]).") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    panels: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (r.get("cache") or "none", int(r["block_length"]))
        panels.setdefault(key, {}).setdefault(r["policy"], []).append(r)
    keys = sorted(panels, key=lambda k: (k[0] != "none", k[0], -k[1]))
    policies = sorted({p for pol in panels.values() for p in pol})
    markers = "os^vDP*Xdph<>8"
    paths = []
    first = rows[0]
    for x_key, label, suffix in (("nfe", "forward evaluations per request (NFE)", "nfe"),
                                 ("wall_s", f"seconds for {first['n']} requests", "seconds")):
        cols = min(len(keys), 4)
        nrows = -(-len(keys) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows + 1.4), squeeze=False, sharey=True)
        for ax, key in zip(axes.flat, keys, strict=False):
            for policy, pts in sorted(panels[key].items()):
                pts = sorted(pts, key=lambda r: float(r[x_key]))
                i = policies.index(policy)
                ax.plot([float(p[x_key]) for p in pts], [100 * float(p["accuracy"]) for p in pts],
                        marker=markers[i % len(markers)], markersize=4, color=plt.cm.tab20(i % 20), label=policy)
            ax.set_xscale("log", base=2)
            ax.set_title(f"cache {key[0]}, block {key[1]}", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylim(-2, 102)
            ax.grid(True, alpha=0.3)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        axes[0][0].set_ylabel("accuracy (%)")
        handles = [plt.Line2D([], [], color=plt.cm.tab20(i % 20), marker=markers[i % len(markers)], label=p)
                   for i, p in enumerate(policies)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(policies), 7), fontsize=7, frameon=False)
        fig.suptitle(f"{first['task']} ({first['model']}): accuracy vs {suffix}, gen_length {first['gen_length']}, "
                     f"{first['device']}", fontsize=10)
        fig.tight_layout(rect=(0, 0.6 / (3.6 * nrows + 1.4) + 0.05, 1, 0.97))
        path = out_dir / f"{stem}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
