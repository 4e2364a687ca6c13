"""The quality suite: accuracy vs NFE (and seconds) of a task model over decoding policies x steps x block sizes,
through the sweep of ``diffuse-engine sweep`` (:func:`diffuse_engine.quality.sweep.run_sweep`).

``diffuse-engine bench quality``: the shipped ``addition`` model (``--model`` another task model);
``--quick``: low_confidence and threshold on 16 held-out problems, one block; the full run: every policy, the
default step grid, 200 problems. Rows go to ``<out>/quality.csv``; the plots (accuracy vs NFE, vs seconds) are
the sweep's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...entrypoints.llm import LLM
from ...presets import PRESETS
from ...progress import progress
from ...quality.sweep import run_sweep
from ...quality.tasks import get_task
from ..common import append_csv, stamp
from .options import resolve_device, resolve_dtype

QUICK_POLICIES = ("low_confidence", "threshold")
KEYS = {"quality.csv": (("model", "task", "policy", "cache", "knob", "block_length", "steps", "gen_length", "n"),
                        "wall_s")}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The quality sweep's options from ``diffuse-engine bench`` flags."""
    model = getattr(args, "model", None) or args.preset or "addition"
    if model in PRESETS:
        raise ValueError(f"the quality suite needs a trained task model (--model addition), not the random-weight "
                         f"preset {model!r}.")
    task = get_task(Path(model).name)
    device = resolve_device(args.device or "cpu")
    quick = bool(args.quick)
    return argparse.Namespace(
        model=model, task=task, device=str(device), dtype=resolve_dtype(args.dtype, device),
        policies=list(QUICK_POLICIES) if quick else None, block_lengths=[task.gen_length] if quick else None,
        caches=getattr(args, "caches", None) or ["none"], limit=16 if quick else 200, progress=args.progress)


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """``diffuse-engine bench quality``: rows appended to ``out/quality.csv``."""
    opts = settings(args)
    llm = LLM(opts.model, device=opts.device, dtype=opts.dtype)
    base = stamp(opts.device)
    with progress(total=None, desc="quality settings", show=opts.progress) as bar:
        def count(done: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        rows = run_sweep(llm, opts.task, model_name=Path(opts.model).name, policies=opts.policies,
                         block_lengths=opts.block_lengths, caches=opts.caches, limit=opts.limit,
                         command=base["command"], on_setting=count)
    rows = [{**row, **base} for row in rows]  # the sweep's own stamp, completed with the versions
    append_csv(out / "quality.csv", rows, union=True)
    return rows
