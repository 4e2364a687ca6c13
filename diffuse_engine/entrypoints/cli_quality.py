"""``diffuse-engine train``, ``eval`` and ``sweep``: train tiny models on tasks with exact checkers, measure a
model's accuracy and speed, and sweep the quality/speed knob (policies x steps x block sizes)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..bench.suites.options import ints
from ..progress import Progress
from ..quality.tasks import CORPORA, TASKS
from .common import add_parallel_args

# The sweep writes under the current folder unless --out names one (never into the package or a checkout's
# committed results): diffuse-results/sweep-<UTC date and time>/.
DEFAULT_SWEEP_ROOT = "diffuse-results"


def default_sweep_dir(now: _dt.datetime | None = None) -> Path:
    """``./diffuse-results/sweep-YYYYmmdd-HHMMSS`` (UTC): a new folder per run."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return Path(DEFAULT_SWEEP_ROOT) / f"sweep-{now.strftime('%Y%m%d-%H%M%S')}"


def _str_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def add_quality_commands(sub: argparse._SubParsersAction) -> None:
    from ..quality.evaluate import POLICIES
    from ..quality.train import TrainConfig
    from ..sampling_params import CACHES

    names = [*TASKS, *CORPORA]
    defaults = TrainConfig(task="addition", out="")

    tr = sub.add_parser("train", help="train a tiny masked-diffusion model on a task (CPU)",
                        description="Train a LLaDA-style model with the masked-diffusion objective and write it "
                                    "as a checkpoint folder with a model card.")
    tr.add_argument("--task", required=True, choices=names)
    tr.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("task", "out", "overwrite"):
            continue
        default = getattr(defaults, f.name)
        kind = int if f.name in ("threads", "test_limit") else type(default)
        tr.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                        help=f"(default {default})")
    tr.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DIR")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "accuracy, NFE, tokens per forward and tokens/s of a model on a task"),
                             ("sweep", cmd_sweep, "accuracy vs NFE and seconds over policies x steps x blocks")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--model", required=True, metavar="DIR", help="model folder, shipped model or Hub name ORG/NAME")
        p.add_argument("--task", required=True, choices=names if name == "eval" else list(TASKS))
        p.add_argument("--limit", type=int, metavar="K", help="first K examples of the test set")
        p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
        p.add_argument("--dtype", help="float32, bfloat16, float16 or float64")
        if name == "eval":
            add_parallel_args(p)
        p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
        if name == "eval":
            p.add_argument("--policy", default="low_confidence", choices=list(POLICIES))
            p.add_argument("--steps", type=int, help="denoising steps (default: one token per step)")
            p.add_argument("--block-length", type=int, help="block size (default: the task's)")
            p.add_argument("--cache", default="none", choices=list(CACHES), help="KV cache (default none)")
            for knob, help_text in (("threshold", "confidence threshold (threshold, wino)"),
                                    ("factor", "factor of the factor rule"), ("eb-gamma", "entropy budget (eb)")):
                p.add_argument("--" + knob, type=float, help=help_text)
            p.add_argument("--json", action="store_true", help="print one JSON object")
            p.add_argument("--infill", action="store_true",
                           help="score infilling instead: the middle of held-out text windows with and without "
                                "their suffix (text-char), or one hidden answer digit at every position (tasks)")
            p.add_argument("--middle", type=int, default=16, metavar="N",
                           help="--infill on text: tokens to fill between 48-token prefix and suffix (default 16)")
        else:
            p.add_argument("--policies", type=_str_list, help=f"comma-separated (default: all: {','.join(POLICIES)})")
            p.add_argument("--steps", type=ints, help="comma-separated step counts (default: halving)")
            p.add_argument("--block-lengths", type=ints, help="comma-separated (default: canvas and half)")
            p.add_argument("--caches", type=_str_list, default=["none"],
                           help=f"comma-separated KV caches among {','.join(CACHES)} (default none)")
            p.add_argument("--out", metavar="DIR",
                           help=f"folder for the CSV (rows appended) and PNGs (default: a new folder "
                                f"./{DEFAULT_SWEEP_ROOT}/sweep-<date>-<time>)")
            p.add_argument("--name", help="file stem (default: <model>_<task>)")
            p.add_argument("--no-plot", action="store_true", help="write the CSV only (no matplotlib needed)")
        p.set_defaults(func=func)


def _command(args: argparse.Namespace) -> str:
    """The command line that ran (recorded with results)."""
    return " ".join(["diffuse-engine", *(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))])


def cmd_train(args: argparse.Namespace) -> int:
    from ..quality.train import TrainConfig, train

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    result = train(TrainConfig(**fields), command=_command(args), progress=not args.quiet)
    print(f"wrote {result.folder} after {result.steps} steps in {result.wall_s:.0f} s")
    for key, value in result.metrics.items():
        if key != "samples":
            print(f"  {key}: {value}")
    return 0


def _llm(args: argparse.Namespace):
    from ..engine import EngineConfig
    from .common import check_device, parallel_config
    from .llm import LLM

    return LLM(args.model, device=check_device(args.device), dtype=args.dtype,
               engine_config=EngineConfig(**parallel_config(args)))


def _model_path(model: str) -> str:
    """The absolute folder that ``--model`` names (a shipped model's name resolves into the package)."""
    from ..loader import resolve_model_path

    return str(resolve_model_path(model).resolve())


def _require_matplotlib() -> None:
    """The sweep's plots need matplotlib: fail before the run, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("the sweep draws its plots with matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'diffuse-engine[eval]'), or pass --no-plot to write the CSV only.") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from ..quality.evaluate import elbo_bits, evaluate_task
    from ..quality.tasks import TextCorpus, get_task

    task = get_task(args.task)
    llm = _llm(args)
    if args.infill:
        return _eval_infill(args, llm, task)
    if isinstance(task, TextCorpus):
        t0 = time.perf_counter()
        progress = Progress("eval", "windows", enabled=not args.quiet)
        try:
            bits = elbo_bits(llm.model, llm.tokenizer, task.held_out_text(), max_windows=args.limit,
                             progress=progress)
        finally:
            progress.close()
        r: dict[str, Any] = {"task": task.name, **bits, "model": _model_path(args.model)}
        r["wall_s"] = round(time.perf_counter() - t0, 3)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{task.name}: held-out {r['bits_per_char']:.4f} bits/char ({r['bits_per_byte']:.4f} bits/byte), "
                  f"ELBO over {r['windows']} windows x {r['samples_per_window']} samples, {r['wall_s']:.1f} s")
        return 0
    knobs = {k: v for k, v in (("threshold", args.threshold), ("factor", args.factor), ("eb_gamma", args.eb_gamma))
             if v is not None}
    progress = Progress("eval", "examples", enabled=not args.quiet)
    try:
        res = evaluate_task(llm, task, args.policy, steps=args.steps, block_length=args.block_length,
                            limit=args.limit, cache=args.cache, progress=progress, **knobs)
    finally:
        progress.close()
    if args.json:
        print(json.dumps({**res.as_dict(), "model": _model_path(args.model)}))
        return 0
    setting = ", ".join(f"{k} {v:g}" for k, v in knobs.items()) or f"{res.steps} steps"
    print(f"{task.name} [{res.policy}, {setting}, block {res.block_length}, gen {res.gen_length}, cache {args.cache}]: "
          f"accuracy {100 * res.accuracy:.2f}% ({res.correct}/{res.n}), NFE {res.nfe:.1f}, "
          f"{res.tokens_per_forward:.2f} tokens/forward, {res.tokens_per_s:,.0f} tokens/s, {res.wall_s:.2f} s")
    for f in res.failures:
        print(f"  wrong: {f['prompt']!r} -> {f['output']!r} (expected {f['expected']!r})")
    return 0


def _eval_infill(args: argparse.Namespace, llm, task) -> int:
    from ..quality.infill import evaluate_digit_infill, evaluate_text_infill
    from ..quality.tasks import TextCorpus

    n = args.limit or 200
    if isinstance(task, TextCorpus):
        r = evaluate_text_infill(llm, task, n=n, middle=args.middle, steps=args.steps,
                                 block_length=args.block_length, cache=args.cache)
        what = f"{r['middle']} held-out tokens between {r['left']} and {r['right']}, {r['steps']} steps"
    else:
        r = evaluate_digit_infill(llm, task, n=n, cache=args.cache)
        what = "one hidden answer digit, every position"
    r["model"] = _model_path(args.model)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{task.name} infilling [{what}, n={r['n']}]: accuracy {100 * r['accuracy_with_suffix']:.2f}% with the "
          f"suffix, {100 * r['accuracy_without_suffix']:.2f}% without it")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..quality.sweep import plot, run_sweep, write_csv
    from ..quality.tasks import get_task

    task = get_task(args.task)
    if not args.no_plot:
        _require_matplotlib()
    out = Path(args.out) if args.out else default_sweep_dir()
    llm = _llm(args)
    model_name = Path(args.model).name or str(args.model)
    stem = args.name or f"{model_name}_{task.name}"

    def show(row: dict[str, Any]) -> None:
        print(f"{row['policy']:<15} {row['cache']:<6} block {row['block_length']:>3} "
              f"{row['knob'] or 'steps ' + str(row['steps']):<15}: "
              f"accuracy {100 * row['accuracy']:6.2f}%  NFE {row['nfe']:6.2f}  TPF {row['tokens_per_forward']:5.2f}  "
              f"{row['wall_s']:.2f} s", flush=True)

    progress = Progress("sweep", "settings", enabled=not args.quiet)

    def show_and_count(row: dict[str, Any]) -> None:
        progress.clear()  # on a terminal the row takes the progress line's place; the line is redrawn below it
        show(row)

    try:
        rows = run_sweep(llm, task, model_name=model_name, policies=args.policies, steps=args.steps,
                         block_lengths=args.block_lengths, caches=args.caches, limit=args.limit,
                         command=_command(args), progress=show_and_count, on_setting=progress)
    finally:
        progress.close()
    csv_path = write_csv(rows, out / f"{stem}.csv")
    print(f"appended {len(rows)} rows to {csv_path}")
    if not args.no_plot:
        for path in plot(rows, out, stem):
            print(f"wrote {path}")
    return 0
