"""Where one engine step's time goes: a ``torch.profiler`` breakdown of steady-state steps (inside a block, past
its first step, after warm-up) per category of work, the idle time of the device, and the top kernels.

For each batch: random weights of ``--preset`` drawn on the device, ``batch`` requests of
``SamplingParams(cache, policy, threshold, gen_length, block_length)`` added to an engine, warm-up steps
(``Engine.step``), a few unprofiled steps timed, then ``--steps`` steps profiled, each inside
``record_function("engine.step")`` and synchronised, and averaged. A profiled step in which any request started a
block (its cache refresh recomputes the whole sequence) is replaced by the next one. Random weights make
confidences meaningless: a threshold step may commit only its top-1 fallback, which is fine for a step profile.

- CUDA: the device's kernels, copies and memsets from the trace. A step's span runs from its ``engine.step``
  range's start to the later of its end and its last kernel's end; ``idle (host)`` = span - the union of the
  kernels' busy intervals: time the device waits for the host (before the first kernel, between kernels, after
  the last), split in ``idle_part`` rows.
- CPU: the same from the top-level aten ops (ops called by no other op), the idle time being Python and
  unprofiled native code.
Category times sum kernel durations (one stream: no overlap). The profiler adds host overhead per op, so the
profiled span exceeds ``step_ms_unprofiled``, and idle time is an upper bound. Kernels replayed from CUDA graphs
should appear one by one in the trace; ``graph_launches`` counts a step's graph launches, and a warning is printed
when such a step shows the device mostly idle (its kernels then missing from the trace: compare --graphs off).

Rows (one CSV, ``--out``): per batch, ``kind`` = step (the span), category (:data:`CATEGORIES`), idle,
idle_part, kernel (the top ``--top`` kernels by total time: name, category, calls per step, ms per step, % of the
step). Categories come from :func:`categorize`.

The command line is :func:`main` (``benchmarks/gpu/profile_step.py`` is its entry point); the trace analysis is
:mod:`.step_trace`; ``diffuse-engine profile step`` (:mod:`.ops_step`) times and checks a step per variant with the
pieces here (:func:`start_engine`, :class:`Stepper`, :func:`reach_steady`, :func:`trace_steps`).

    python benchmarks/gpu/profile_step.py --out profile.csv                       # CUDA: LLaDA-8B shape, bf16
    python benchmarks/gpu/profile_step.py --device cpu --out /tmp/profile.csv     # CPU: llada-tiny, fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import append_csv, engine_config, stamp, sync
from .step_trace import CATEGORIES, MARKER, RULES, breakdown, breakdown_rows, categorize

__all__ = ["CATEGORIES", "DTYPES", "MARKER", "RULES", "Stepper", "breakdown", "breakdown_rows", "categorize", "main",
           "parse_args", "profile_batch", "reach_steady", "start_engine", "trace_steps"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="default: llada-8b on CUDA, llada-tiny on the CPU")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--batches", default=None, help="comma-separated; default: 1,32 on CUDA, 1,4 on the CPU")
    ap.add_argument("--gen-length", type=int, default=None, help="default: 256 on CUDA, 64 on the CPU")
    ap.add_argument("--block-length", type=int, default=None, help="default: 32 on CUDA, 16 on the CPU")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    ap.add_argument("--policy", default="threshold", choices=["fixed", "threshold", "factor", "eb"])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--graphs", default="default", choices=["default", "on", "off"],
                    help="EngineConfig.cuda_graphs (when the engine has it): default = the engine's choice")
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steady steps profiled and averaged")
    ap.add_argument("--top", type=int, default=15, help="kernels listed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="CSV to append to")
    ap.add_argument("--trace", type=Path, default=None, help="folder for the Chrome traces (profile_b<batch>.json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("llada-8b" if cuda else "llada-tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,4")).split(",") if b]
    args.gen_length = args.gen_length or (256 if cuda else 64)
    args.block_length = args.block_length or (32 if cuda else 16)
    if args.steps < 1 or args.warmup_steps < 1:
        ap.error("--steps and --warmup-steps must be at least 1.")
    return args


class Stepper:
    """Steps an engine and says whether each step was steady: every request stayed in the block of its previous
    step (so none recomputed its whole sequence to start a block)."""

    def __init__(self, engine, batch: int, device: torch.device) -> None:
        self.engine, self.batch, self.device = engine, batch, device
        self.block: dict[str, int] = {}

    def step(self) -> bool:
        outs = self.engine.step()
        sync(self.device)
        if len(outs) != self.batch or any(o.finished for o in outs):
            raise RuntimeError(f"{len(outs)} of {self.batch} requests stepped (or one finished) before the profile "
                               f"was done; use a longer --gen-length or fewer --warmup-steps / --steps.")
        steady = all(self.block.get(o.request_id) == o.block for o in outs)
        self.block = {o.request_id: o.block for o in outs}
        return steady


def start_engine(model, config, batch: int, params, graphs: str | None, prompt_len: int, seed: int):
    """An engine over ``model`` with ``batch`` requests of random ``prompt_len``-token prompts under ``params``
    (``graphs``: "on" / "off" / None for the engine's default CUDA-graph choice)."""
    from ..entrypoints.llm import LLM

    engine = LLM.from_model(model, engine_config=engine_config(batch, prompt_len + params.gen_length, graphs)).engine
    gen = torch.Generator().manual_seed(seed + batch)
    high = min(config.vocab_size, 256)
    for _ in range(batch):
        engine.add_request(torch.randint(0, high, (prompt_len,), generator=gen).tolist(), params)
    return engine


def reach_steady(stepper: Stepper, warmup_steps: int, block_length: int) -> None:
    """Step ``warmup_steps`` times, then on until a step is steady (into the middle of a block)."""
    steady = False
    for _ in range(warmup_steps):
        steady = stepper.step()
    for _ in range(2 * block_length):
        if steady:
            break
        steady = stepper.step()


def trace_steps(stepper: Stepper, steps: int, path: Path) -> dict:
    """Profile ``steps`` steady steps (each inside ``record_function(MARKER)``), write the Chrome trace to ``path``
    and return its :func:`breakdown`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if stepper.device.type == "cuda" else [])
    keep = []
    with profile(activities=activities) as prof:
        stepper.step()  # outside any range: the profiler's own start-up costs land in no step
        for i in range(steps + 4):
            with record_function(MARKER):
                if stepper.step():
                    keep.append(i)
            if len(keep) == steps:
                break
    if not keep:
        raise RuntimeError("no steady step among those profiled (every one started a block).")
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return breakdown(json.loads(path.read_text()), keep)


def profile_batch(model, config, batch: int, args, device: torch.device, trace_dir: Path) -> tuple[dict, float]:
    """The breakdown of ``args.steps`` steady steps at ``batch`` and the median unprofiled step time (ms)."""
    from ..sampling_params import SamplingParams

    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length, cache=args.cache,
                            policy=args.policy, threshold=args.threshold, seed=args.seed)
    graphs = None if args.graphs == "default" else args.graphs
    engine = start_engine(model, config, batch, params, graphs, args.prompt_len, args.seed)
    stepper = Stepper(engine, batch, device)
    reach_steady(stepper, args.warmup_steps, args.block_length)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        if stepper.step():
            times.append(1e3 * (time.perf_counter() - t))
    result = trace_steps(stepper, args.steps, trace_dir / f"profile_b{batch}.json")
    for rid in list(stepper.block):
        engine.abort(rid)
    times.sort()
    return result, times[len(times) // 2] if times else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from ..models import build_model
    from ..presets import from_name

    device = torch.device(args.device)
    config = from_name(args.preset).config
    t0 = time.perf_counter()
    model = build_model(config, device=device, dtype=DTYPES[args.dtype]).init_random_(args.seed, on_device=True)
    print(f"# {args.preset}: {config.num_parameters() / 1e6:.1f}M parameters, {args.dtype} on {device}, built in "
          f"{time.perf_counter() - t0:.1f}s; cache {args.cache}, policy {args.policy} ({args.threshold}), gen "
          f"{args.gen_length}, block {args.block_length}, prompt {args.prompt_len}", flush=True)
    base = stamp(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.trace or Path(tmp)
        for batch in args.batches:
            b, unprofiled = profile_batch(model, config, batch, args, device, trace_dir)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            context = {**base, "preset": args.preset, "dtype": args.dtype, "batch": batch, "cache": args.cache,
                       "policy": args.policy, "threshold": args.threshold, "prompt_len": args.prompt_len,
                       "gen_length": args.gen_length, "block_length": args.block_length, "cuda_graphs": args.graphs,
                       "source": b["source"], "profiled_steps": b["steps"], "step_ms": round(b["span_us"] / 1e3, 4),
                       "step_ms_unprofiled": round(unprofiled, 4), "graph_launches": b["graph_launches"]}
            batch_rows = [{**context, **r} for r in breakdown_rows(b, args.top)]
            rows += batch_rows
            print_breakdown(batch, b, unprofiled, batch_rows)
            busy = sum(b["categories_us"].values())
            if b["graph_launches"] and busy < 0.2 * b["span_us"]:
                print(f"# warning: the device was busy {100 * busy / b['span_us']:.0f}% of a step that launched CUDA "
                      f"graphs: their kernels may be missing from the trace (compare with --graphs off).")
            written = append_csv(args.out, batch_rows, union=True)
            print(f"# appended {len(batch_rows)} rows to {written}", flush=True)
    return rows


def print_breakdown(batch: int, b: dict, unprofiled: float, rows: list[dict]) -> None:
    print(f"\nbatch {batch}: step {b['span_us'] / 1e3:.3f} ms profiled ({b['steps']} steps, {b['source']}), "
          f"{unprofiled:.3f} ms unprofiled")
    for r in rows:
        if r["kind"] in ("category", "idle", "idle_part", "kernel"):
            name = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
            indent = "    " if r["kind"] in ("idle_part", "kernel") else "  "
            calls = f"{r['calls']:>8}" if r["calls"] != "" else " " * 8
            print(f"{indent}{r['kind']:<9} {name:<74} {calls} {r['ms']:>10.4f} ms {r['pct_of_step']:>6.1f} %")
    sys.stdout.flush()
