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

    python benchmarks/gpu/profile_step.py --out profile.csv                       # CUDA: LLaDA-8B shape, bf16
    python benchmarks/gpu/profile_step.py --device cpu --out /tmp/profile.csv     # CPU: llada-tiny, fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffuse_engine.bench.common import append_csv, engine_config, stamp, sync  # noqa: E402

CATEGORIES = ("GEMM", "attention", "head", "commit", "norms/elementwise", "other")
MARKER = "engine.step"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")

# How a kernel (CUDA) or top-level aten op (CPU) name maps to a category: rules tried in this order, the first
# whose pattern (a case-insensitive regular expression searched in the name) matches wins; no match: "other".
# The order settles names that match two rules: attention kernels built on cutlass (fmha_cutlassF...) are
# attention, not GEMM; aten::addmm is GEMM, not an elementwise "add"; host<->device copies and memsets run on the
# copy engines and go to "other" before "copy" could claim them. The LM head's matmul counts under "head" only
# when fused (lm_head_stats); an unfused head's matmul is a GEMM like the others (names alone cannot tell).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("other", (r"^memcpy", r"^memset")),
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa", "scaled_dot_product", "combine_splits")),
    ("head", ("row_stats", "lm_head", "softmax", "argmax", "topk", "gumbel", "noise", "sample", r"^_merge_kernel$")),
    ("commit", ("commit",)),
    ("GEMM", ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "matmul", r"\bsm\d\d_",
              r"^aten::(linear|addmm|mm|bmm|baddbmm|addbmm)$")),
    ("norms/elementwise", ("rms", "norm", "rope", "rotary", "elementwise", "vectorized", "add", "mul", "copy", "cat",
                           "index", "silu", "gelu", "neg", "rsqrt", "pow", "embedding", "where", "fill",
                           r"^aten::to$")),
)
_RULES = [(category, re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE))
          for category, patterns in RULES]


def categorize(name: str) -> str:
    """The category (one of :data:`CATEGORIES`) of a kernel or aten op called ``name``, by :data:`RULES`."""
    for category, pattern in _RULES:
        if pattern.search(name):
            return category
    return "other"


# ------------------------------------------------------------------------------------------------ trace analysis
def _span(e: dict) -> tuple[float, float]:
    return float(e["ts"]), float(e["ts"]) + float(e.get("dur") or 0.0)


def _top_level(ops: list[dict]) -> list[dict]:
    """The ops that no other op of the same thread encloses."""
    out = []
    by_thread: dict[tuple, list[dict]] = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur") or 0.0)))
        end = float("-inf")
        for e in events:
            start, stop = _span(e)
            if start >= end:  # else nested in the op that ends at ``end``
                out.append(e)
                end = stop
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def breakdown(trace: dict, keep: list[int] | None = None, marker: str = MARKER) -> dict:
    """Average breakdown (microseconds per step) of the ``marker`` ranges of a Chrome trace exported by
    ``torch.profiler`` (the ``keep``-th ranges only, in time order; None: all). Device events (kernels, copies,
    memsets) when the trace has any, else top-level CPU ops."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == marker),
                   key=lambda e: float(e["ts"]))
    if not steps:
        raise ValueError(f"the trace has no {marker!r} range.")
    device = [e for e in events if e.get("cat") in DEVICE_EVENTS]
    work = device if device else _top_level([e for e in events if e.get("cat") == "cpu_op"])
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "GraphLaunch" in str(e.get("name"))]
    chosen = range(len(steps)) if keep is None else keep
    if not chosen:
        raise ValueError("no step to analyse.")
    acc = {"span": 0.0, "before": 0.0, "between": 0.0, "after": 0.0, "graph_launches": 0.0,
           "categories": dict.fromkeys(CATEGORIES, 0.0), "calls": dict.fromkeys(CATEGORIES, 0.0), "kernels": {}}
    for i in chosen:
        lo = float(steps[i]["ts"])
        hi = float(steps[i + 1]["ts"]) if i + 1 < len(steps) else float("inf")
        mine = [e for e in work if lo <= float(e["ts"]) < hi]
        start, end = _span(steps[i])
        if mine:
            end = max(end, max(_span(e)[1] for e in mine))
        intervals = [(max(s, start), min(t, end)) for s, t in map(_span, mine)]
        busy = _union(intervals)
        span = end - start
        first = min((s for s, _ in intervals), default=end)
        last = max((t for _, t in intervals), default=end)
        acc["span"] += span
        acc["before"] += first - start
        acc["after"] += end - last if mine else 0.0
        acc["between"] += (last - first) - busy if mine else 0.0
        acc["graph_launches"] += sum(1 for e in launches if lo <= float(e["ts"]) < hi)
        for e, (s, t) in zip(mine, intervals, strict=True):
            name = str(e.get("name"))
            category = categorize(name)
            acc["categories"][category] += t - s
            acc["calls"][category] += 1
            calls, total = acc["kernels"].get(name, (0, 0.0))
            acc["kernels"][name] = (calls + 1, total + t - s)
    n = len(chosen)
    return {"source": "cuda kernels" if device else "cpu ops", "steps": n, "span_us": acc["span"] / n,
            "idle_us": (acc["before"] + acc["between"] + acc["after"]) / n,
            "idle_parts_us": {"before first kernel": acc["before"] / n, "between kernels": acc["between"] / n,
                              "after last kernel": acc["after"] / n},
            "categories_us": {c: v / n for c, v in acc["categories"].items()},
            "calls": {c: v / n for c, v in acc["calls"].items()},
            "kernels_us": {k: (c / n, t / n) for k, (c, t) in acc["kernels"].items()},
            "graph_launches": acc["graph_launches"] / n}


def breakdown_rows(b: dict, top: int = 15) -> list[dict]:
    """CSV rows of a :func:`breakdown`: step, categories, idle, idle parts, top kernels (ms and % of the step)."""
    span = b["span_us"]

    def row(kind: str, name: str, category: str, calls: float | str, us: float) -> dict:
        return {"kind": kind, "name": name, "category": category,
                "calls": round(calls, 2) if isinstance(calls, float) else calls,
                "ms": round(us / 1e3, 4), "pct_of_step": round(100 * us / span, 2) if span else 0.0}

    rows = [row("step", "step", "", "", span)]
    rows += [row("category", c, c, b["calls"][c], b["categories_us"][c]) for c in CATEGORIES]
    rows.append(row("idle", "idle (host)", "idle", "", b["idle_us"]))
    rows += [row("idle_part", name, "idle", "", us) for name, us in b["idle_parts_us"].items()]
    ranked = sorted(b["kernels_us"].items(), key=lambda kv: -kv[1][1])[:top]
    rows += [row("kernel", name, categorize(name), calls, us) for name, (calls, us) in ranked]
    return rows


# ----------------------------------------------------------------------------------------------------- profiling
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


def profile_batch(model, config, batch: int, args, device: torch.device, trace_dir: Path) -> tuple[dict, float]:
    """The breakdown of ``args.steps`` steady steps at ``batch`` and the median unprofiled step time (ms)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from diffuse_engine import LLM, SamplingParams

    params = SamplingParams(gen_length=args.gen_length, block_length=args.block_length, cache=args.cache,
                            policy=args.policy, threshold=args.threshold, seed=args.seed)
    graphs = None if args.graphs == "default" else args.graphs
    engine = LLM.from_model(model, engine_config=engine_config(batch, args.prompt_len + args.gen_length, graphs)).engine
    gen = torch.Generator().manual_seed(args.seed + batch)
    high = min(config.vocab_size, 256)
    for _ in range(batch):
        engine.add_request(torch.randint(0, high, (args.prompt_len,), generator=gen).tolist(), params)
    stepper = Stepper(engine, batch, device)
    steady = False
    for _ in range(args.warmup_steps):
        steady = stepper.step()
    for _ in range(2 * args.block_length):  # into the middle of a block
        if steady:
            break
        steady = stepper.step()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        if stepper.step():
            times.append(1e3 * (time.perf_counter() - t))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    keep = []
    with profile(activities=activities) as prof:
        stepper.step()  # outside any range: the profiler's own start-up costs land in no step
        for i in range(args.steps + 4):
            with record_function(MARKER):
                if stepper.step():
                    keep.append(i)
            if len(keep) == args.steps:
                break
    if not keep:
        raise RuntimeError("no steady step among those profiled (every one started a block).")
    trace_dir.mkdir(parents=True, exist_ok=True)
    path = trace_dir / f"profile_b{batch}.json"
    prof.export_chrome_trace(str(path))
    result = breakdown(json.loads(path.read_text()), keep)
    for rid in list(stepper.block):
        engine.abort(rid)
    times.sort()
    return result, times[len(times) // 2] if times else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from diffuse_engine.models import build_model
    from diffuse_engine.presets import from_name

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


if __name__ == "__main__":
    main()
