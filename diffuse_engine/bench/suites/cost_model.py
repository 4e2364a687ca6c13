"""The cost-model suite: the roofline cost model (``diffuse_engine/engine/cost_model.py``) predicted vs measured
step times (see ``benchmarks/bench_cost_model.py`` for the points, ``block`` and ``full``, and why each point is the
median of one sample per pass over the sweep, with a fresh calibration per pass).

``diffuse-engine bench cost-model``: llada-tiny (``--preset`` another); ``--quick`` a few points at cached contexts
0, 64 and 256. Rows go to ``<out>/cost_model.csv``; the plots (:mod:`..plots`) show predicted vs measured and step
time vs cached context."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

import torch

from ...engine import calibration, cost_model
from ...engine.attention_plan import AttentionPlan, SeqPlan
from ...engine.kv_cache import PagedKVCache
from ...models import TokenLayout, build_model
from ...presets import from_name
from ...progress import progress
from ..common import append_csv, print_table, stamp
from .options import DTYPES, given, resolve_device, resolve_dtype

COLUMNS = ["preset", "case", "batch", "query", "context", "head_rows", "measured_ms", "predicted_ms", "ratio",
           "regime"]
TOLERANCE = 0.25
KEYS = {"cost_model.csv": (("preset", "dtype", "threads", "case", "batch", "query", "context", "head_rows"),
                           "measured_ms")}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The cost-model benchmark's options from ``diffuse-engine bench`` flags."""
    if getattr(args, "model", None):
        raise ValueError("the cost-model suite runs random weights of a preset: use --preset NAME.")
    device = resolve_device(args.device or "cpu")
    quick = bool(args.quick)
    presets = args.preset or ("llada-tiny" if quick else "llada-small,llada-tiny")
    for name in presets.split(","):
        from_name(name)
    return argparse.Namespace(
        presets=presets, batches=given(args, "batches", [1, 4] if quick else [1, 2, 4, 8, 16, 32]),
        blocks=[8, 32] if quick else [8, 16, 32, 64], contexts=[0, 64, 256] if quick else [0, 128, 512],
        full_batches=[1, 4] if quick else [1, 2, 4, 8, 16], full_lengths=[64] if quick else [64, 128, 256, 512],
        reps=3 if quick else 5, threads=1, device=str(device), dtype=resolve_dtype(args.dtype, device),
        progress=args.progress)


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """``diffuse-engine bench cost-model``: rows appended to ``out/cost_model.csv``."""
    rows, ceilings = measure_all(settings(args))
    summarize(rows)
    append_csv(out / "cost_model.csv", rows)
    return rows


def points(opts: argparse.Namespace) -> list[tuple[str, int, int, int, int]]:
    """(case, batch, query tokens, context tokens, head rows) per sequence."""
    out = [("block", b, q, ctx, max(1, q // 2)) for b in opts.batches for q in opts.blocks for ctx in opts.contexts]
    out += [("full", b, s, 0, min(32, s)) for b in opts.full_batches for s in opts.full_lengths]
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


def _sample(opts, device, dtype, pts, calibrations: list, samples: dict) -> None:
    """Every point of every preset, one sample per pass, a calibration at the start of each pass."""
    presets = opts.presets.split(",")
    for name in progress(presets, total=len(presets), desc="cost-model", show=getattr(opts, "progress", None)):
        cfg = from_name(name).config
        model = build_model(cfg, device=device, dtype=dtype).init_random_(0).eval()
        need = max(b * (ctx + q) for _, b, q, ctx, _ in pts)
        page = 16
        cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, -(-need // page) + max(opts.batches),
                             page, dtype, device)
        cache.k.normal_()
        cache.v.normal_()
        for pt in pts:
            samples[name, pt] = []
        for _ in range(opts.reps):  # passes over the sweep: a burst of load elsewhere hits one sample per point
            calibrations.append(calibrate_fresh(device, dtype))
            for pt in pts:
                fn = step_fn(model, cache, *pt[1:], device)
                samples[name, pt].append(calibration.median_seconds(fn, device, 1))
                for p in getattr(fn, "pages", []):
                    cache.free(p)
        del model, cache


def measure_all(opts: argparse.Namespace) -> tuple[list[dict], cost_model.DeviceCeilings]:
    """Measure every point of every preset (one sample per pass, a calibration at the start of each pass), then
    predict them all with the median ceilings of the run's calibrations."""
    if opts.reps < 1 or opts.threads < 1:
        raise ValueError("the repetitions and threads must be positive integers.")
    torch.set_num_threads(opts.threads)
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    base = stamp(device)
    pts = points(opts)
    calibrations, samples = [], {}
    _sample(opts, device, dtype, pts, calibrations, samples)
    ceilings = median_ceilings(calibrations)
    esize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for name in opts.presets.split(","):
        cm = cost_model.CostModel(from_name(name).config, ceilings, esize)
        for pt in pts:
            case, b, q, ctx, h = pt
            times = samples[name, pt]
            measured = statistics.median(times)
            est = cm.predict([(q, ctx, h)] * b)
            ratio = est.seconds / measured
            rows.append({**base, "threads": opts.threads, "dtype": opts.dtype, "preset": name, "case": case,
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


def summarize(rows: list[dict]) -> None:
    """Print the share of points within 25%, the ratio's median and range per preset, and the worst cases."""
    for name in sorted({r["preset"] for r in rows}) + ["all"]:
        sel = [r for r in rows if name in ("all", r["preset"])]
        ok = sum(r["within_25pct"] for r in sel)
        ratios = sorted(r["ratio"] for r in sel)
        print(f"{name}: {ok}/{len(sel)} = {100 * ok / len(sel):.0f}% within 25%; predicted/measured median "
              f"{statistics.median(ratios):.2f}, range {ratios[0]:.2f}..{ratios[-1]:.2f}")
    worst = sorted(rows, key=lambda r: abs(r["ratio"] - 1), reverse=True)[:8]
    print("worst cases:")
    print_table(worst, COLUMNS)


def title(rows: list[dict], ceilings: cost_model.DeviceCeilings | None = None) -> str:
    """The predicted-vs-measured plot's title: device, dtype, share within 25%, ceilings, commit."""
    ok = sum(str(r["within_25pct"]) == "True" for r in rows)
    first = rows[0]
    bw = float(ceilings.bandwidth_gbs if ceilings else first["bandwidth_gbs"])
    peak = float(ceilings.peak_tflops if ceilings else first["peak_tflops"])
    return (f"cost model vs measured, {first['device']}, {first['dtype']}: {ok}/{len(rows)} within 25%\n"
            f"copy {bw:.1f} GB/s, matmul {1e3 * peak:.0f} GFLOP/s, commit {first['commit']}")
