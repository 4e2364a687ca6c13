"""Validation of the roofline cost model (``diffuse_engine/engine/cost_model.py``): predicted vs measured step times.

For random models of LLaDA presets, each point times one step's forward and LM head exactly as the engine runs
them (``engine/runner.py``): a packed forward through ``model.hidden_states`` and ``model.logits_from_hidden``
over the head rows. Points:

- ``block``: B sequences, each recomputing a block of q tokens over ``ctx`` cached tokens (the engine's
  prefix / dual-cache step: an ``AttentionPlan`` whose sequences read ``[0, ctx)`` from a paged cache; ``ctx = 0`` is a
  plain packed forward of the block), q / 2 rows through the head;
- ``full``: B sequences of S tokens recomputed whole (the engine's no-cache step), min(32, S) head rows each.

Each point is the median of ``--reps`` samples, one per pass over the whole sweep (a warm-up run, then the
timed run), so that a burst of load from elsewhere on a shared machine touches one sample of a point, not all
of them. The ceilings are calibrated at the start of every pass (no cached calibration) and the prediction uses
each field's median over those calibrations, so that they see the same machine as the measurements. Rows go to
``<out>/cost_model_cpu.csv`` (appended, with date, commit, device, command), the plot to
``<out>/cost_model_cpu.png`` (log-log, y = x and +-25%).

    python benchmarks/bench_cost_model.py            # ~2 min on one core; ./bench-results/cost_model/
    python benchmarks/bench_cost_model.py --quick    # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffuse_engine.bench.common import OUT, append_csv, print_table, stamp  # noqa: E402

from diffuse_engine.engine import calibration, cost_model  # noqa: E402
from diffuse_engine.engine.attention_plan import AttentionPlan, SeqPlan  # noqa: E402
from diffuse_engine.engine.kv_cache import PagedKVCache  # noqa: E402
from diffuse_engine.models import TokenLayout, build_model  # noqa: E402
from diffuse_engine.presets import from_name  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ["preset", "case", "batch", "query", "context", "head_rows", "measured_ms", "predicted_ms", "ratio",
           "regime"]
TOLERANCE = 0.25


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="llada-small,llada-tiny")
    ap.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16, 32], help="sequences per step (block points)")
    ap.add_argument("--blocks", type=ints, default=[8, 16, 32, 64], help="query tokens per sequence (block points)")
    ap.add_argument("--contexts", type=ints, default=[0, 128, 512], help="cached tokens per sequence")
    ap.add_argument("--full-batches", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--full-lengths", type=ints, default=[64, 128, 256, 512], help="tokens per sequence (full)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--quick", action="store_true", help="tiny model, few points (CI smoke run)")
    ap.add_argument("--out", type=Path, default=OUT / "cost_model",
                    help=f"folder of the CSV and the PNG (default {OUT}/cost_model)")
    args = ap.parse_args(argv)
    if args.quick:
        args.presets, args.batches, args.blocks, args.contexts = "llada-tiny", [1, 4], [8, 32], [0, 64]
        args.full_batches, args.full_lengths, args.reps = [1, 4], [64], 3
    if args.reps < 1 or args.threads < 1:
        raise ValueError("--reps and --threads must be positive integers.")
    return args


def points(args: argparse.Namespace) -> list[tuple[str, int, int, int, int]]:
    """(case, batch, query tokens, context tokens, head rows) per sequence."""
    out = [("block", b, q, ctx, max(1, q // 2)) for b in args.batches for q in args.blocks for ctx in args.contexts]
    out += [("full", b, s, 0, min(32, s)) for b in args.full_batches for s in args.full_lengths]
    return out


def step_fn(model, cache: PagedKVCache | None, batch: int, query: int, context: int, head_rows: int,
            device: torch.device):
    """One step's forward and head, built as the engine's runner builds it (``_forward_full`` for a plain
    packed forward, with an AttentionPlan when the sequences read cached keys)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(batch * 100003 + query * 101 + context)
    tokens = torch.randint(0, min(256, cfg.vocab_size - 8), (batch * query,), generator=gen).to(device)
    rows = torch.cat([torch.arange(head_rows) + i * query for i in range(batch)]).to(device)
    if context == 0:
        positions = torch.arange(query).repeat(batch).to(device)

        @torch.inference_mode()
        def run() -> torch.Tensor:
            hidden = model.hidden_states(tokens, positions, TokenLayout.packed([query] * batch))
            return model.logits_from_hidden(hidden[rows])
        return run
    pages = [cache.allocate(context + query) for _ in range(batch)]

    @torch.inference_mode()
    def run_cached() -> torch.Tensor:
        plans = [SeqPlan(context, query, torch.arange(context, context + query), [(0, context)], None, p)
                 for p in pages]
        pos = torch.arange(context, context + query, device=device).repeat(batch)
        layout = TokenLayout.packed([query] * batch, kv=AttentionPlan(cache, plans, device))
        hidden = model.hidden_states(tokens, pos, layout)
        return model.logits_from_hidden(hidden[rows])
    run_cached.pages = pages  # type: ignore[attr-defined]
    return run_cached


def measure(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up run (the calibration's own timer)."""
    return calibration.median_seconds(fn, device, reps)


def calibrate_fresh(device: torch.device, dtype: torch.dtype) -> cost_model.DeviceCeilings:
    """A new calibration (the user's cache is neither read nor written)."""
    old = os.environ.get(calibration.CACHE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[calibration.CACHE_ENV] = tmp
        try:
            return calibration.calibrate(device, dtype, use_cache=False)
        finally:
            if old is None:
                os.environ.pop(calibration.CACHE_ENV, None)
            else:
                os.environ[calibration.CACHE_ENV] = old


def median_ceilings(runs: list[cost_model.DeviceCeilings]) -> cost_model.DeviceCeilings:
    """Each measured field's median over several calibrations."""
    fields = {}
    for f in dataclasses.fields(runs[0]):
        values = [getattr(r, f.name) for r in runs]
        if all(isinstance(v, float) for v in values):
            fields[f.name] = statistics.median(values)
    return dataclasses.replace(runs[0], **fields)


def run(args: argparse.Namespace) -> tuple[list[dict], cost_model.DeviceCeilings]:
    """Measure every point of every preset (one sample per pass, a calibration at the start of each pass), then
    predict them all with the median ceilings of the run's calibrations."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base = stamp(device)
    pts = points(args)
    calibrations, samples = [], {}
    for name in args.presets.split(","):
        cfg = from_name(name).config
        model = build_model(cfg, device=device, dtype=dtype).init_random_(0).eval()
        need = max(b * (ctx + q) for _, b, q, ctx, _ in pts)
        page = 16
        cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, -(-need // page) + max(args.batches),
                             page, dtype, device)
        cache.k.normal_()
        cache.v.normal_()
        for pt in pts:
            samples[name, pt] = []
        for _ in range(args.reps):  # passes over the sweep: a burst of load elsewhere hits one sample per point
            calibrations.append(calibrate_fresh(device, dtype))
            for pt in pts:
                fn = step_fn(model, cache, *pt[1:], device)
                samples[name, pt].append(measure(fn, device, 1))
                for p in getattr(fn, "pages", []):
                    cache.free(p)
        del model, cache
    ceilings = median_ceilings(calibrations)
    esize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for name in args.presets.split(","):
        cm = cost_model.CostModel(from_name(name).config, ceilings, esize)
        for pt in pts:
            case, b, q, ctx, h = pt
            times = samples[name, pt]
            measured = statistics.median(times)
            est = cm.predict([(q, ctx, h)] * b)
            ratio = est.seconds / measured
            rows.append({**base, "threads": args.threads, "dtype": args.dtype, "preset": name, "case": case,
                         "batch": b, "query": q, "context": ctx, "head_rows": h, "tokens": b * q,
                         "measured_ms": measured * 1e3, "predicted_ms": est.seconds * 1e3, "ratio": ratio,
                         "within_25pct": abs(ratio - 1) <= TOLERANCE, "regime": est.regime,
                         "intensity": est.intensity, "bytes": est.bytes, "flops": est.flops,
                         **{f"{k}_ms": v * 1e3 for k, v in est.phases.items()}, "overhead_ms": est.overhead_s * 1e3,
                         "bandwidth_gbs": ceilings.bandwidth_gbs, "peak_tflops": ceilings.peak_tflops,
                         "matmul_half_rows": ceilings.matmul_half_rows,
                         "attention_half_dim": ceilings.attention_half_dim, "alloc_write_gbs": ceilings.alloc_write_gbs,
                         "measured_min_ms": min(times) * 1e3, "measured_max_ms": max(times) * 1e3})
            print(f"{name:11s} {case:5s} B={b:<3d} q={q:<4d} ctx={ctx:<4d} rows={h:<3d} measured "
                  f"{measured * 1e3:9.3f} ms  predicted {est.seconds * 1e3:9.3f} ms  x{ratio:.2f}", flush=True)
    spread = {f: (min(getattr(c, f) for c in calibrations), max(getattr(c, f) for c in calibrations))
              for f in ("bandwidth_gbs", "peak_tflops", "layer_overhead_s")}
    print(f"{len(calibrations)} calibrations, min..max: " + ", ".join(f"{k} {a:.4g}..{b:.4g}"
                                                                   for k, (a, b) in spread.items()))
    return rows, ceilings


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Predicted vs measured, log-log, with y = x and the +-25% band; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(6.5, 6))
    markers = {"block": "o", "full": "s"}
    presets = sorted({r["preset"] for r in rows})
    for i, name in enumerate(presets):
        for case, marker in markers.items():
            pts = [r for r in rows if r["preset"] == name and r["case"] == case]
            if pts:
                ax.scatter([r["measured_ms"] for r in pts], [r["predicted_ms"] for r in pts], s=18, marker=marker,
                           color=plt.cm.tab10(i), alpha=0.8, label=f"{name} {case}")
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows) / 1.5
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows) * 1.5
    xs = [lo, hi]
    ax.plot(xs, xs, "k-", lw=1, label="y = x")
    ax.plot(xs, [x * (1 + TOLERANCE) for x in xs], "k--", lw=0.8, label="+-25%")
    ax.plot(xs, [x * (1 - TOLERANCE) for x in xs], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(rows: list[dict]) -> None:
    for name in sorted({r["preset"] for r in rows}) + ["all"]:
        sel = [r for r in rows if name in ("all", r["preset"])]
        ok = sum(r["within_25pct"] for r in sel)
        ratios = sorted(r["ratio"] for r in sel)
        print(f"{name}: {ok}/{len(sel)} = {100 * ok / len(sel):.0f}% within 25%; predicted/measured median "
              f"{statistics.median(ratios):.2f}, range {ratios[0]:.2f}..{ratios[-1]:.2f}")
    worst = sorted(rows, key=lambda r: abs(r["ratio"] - 1), reverse=True)[:8]
    print("worst cases:")
    print_table(worst, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, ceilings = run(args)
    print(f"ceilings: {ceilings}")
    print_table(rows, COLUMNS)
    summarize(rows)
    out = args.out
    append_csv(out / "cost_model_cpu.csv", rows)
    ok = sum(r["within_25pct"] for r in rows)
    title = (f"cost model vs measured, {rows[0]['device']}, {args.dtype}: {ok}/{len(rows)} within 25%\n"
             f"copy {ceilings.bandwidth_gbs:.1f} GB/s, matmul {1e3 * ceilings.peak_tflops:.0f} GFLOP/s, "
             f"commit {rows[0]['commit']}")
    plot(rows, out / "cost_model_cpu.png", title)
    print(f"appended {len(rows)} rows to {out / 'cost_model_cpu.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
