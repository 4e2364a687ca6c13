"""The engine suite: tokens/s, NFE and step time of the engine on a random-weight preset (or ``--model``'s checkpoint),
against the reference loop (batch-1 generations, with a check that both produce identical tokens) and against the
step's floor max(bytes / bandwidth, FLOPs / peak) with the device's measured ceilings. ``benchmarks/bench_engine.py``
documents the two timings (whole generations; steady first-block steps) and the cache / CUDA-graph dimensions.

``diffuse-engine bench engine``: ``--quick`` runs llada-tiny at batches 1, 2, 4 without a cache in seconds on
the CPU; the full run sweeps batches 1..16 with and without the dual cache (``--batches``, ``--caches``,
``--graphs``, ``--timing``... override). Rows go to ``<out>/engine.csv``."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from ...entrypoints.llm import LLM
from ...models import build_model
from ...presets import from_name
from ...progress import progress
from ...sampling_params import SamplingParams
from .. import reference
from ..common import append_csv, engine_config, measure_ceilings, print_table, stamp, sync
from .engine_steps import (
    check_window,
    configurations,
    measure,
    random_prompts,
    run_reference,
    schedule_items,
    significant,
    window_floor,
)
from .options import DTYPES, PartialFailure, given, resolve_device, resolve_dtype

EXTRA_COLUMNS = ("floor_ms", "pct_of_floor", "bound", "memory_floor_ms", "compute_floor_ms", "reference_s",
                 "reference_tok_s", "speedup", "identical_tokens")
COLUMNS = ["batch", "cache", "cuda_graphs", "timing", "tokens_per_step", "nfe", "engine_tok_s", "step_ms", "floor_ms",
           "pct_of_floor", "bound", "speedup", "identical_tokens"]
CACHES = ("none", "prefix", "dual")
GRAPHS = ("on", "off")
# ``--compare``: the columns that name a row of engine.csv, and its time
KEYS = {"engine.csv": (("preset", "dtype", "batch", "cache", "cuda_graphs", "timing", "prompt_len", "gen_length",
                        "block_length", "tokens_per_step"), "step_ms")}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The engine benchmark's options from ``diffuse-engine bench`` flags: the --quick or full preset, then every
    flag that was given."""
    device = resolve_device(args.device)
    quick = bool(args.quick)
    opts = argparse.Namespace(
        preset=args.preset or ("llada-tiny" if quick else "llada-small"), device=str(device),
        dtype=resolve_dtype(args.dtype, device), init="on-device" if device.type == "cuda" else "cpu",
        gen_lengths=[32] if quick else [128], block_length=16 if quick else 32, prompt_len=8 if quick else 32,
        batches=[1, 2, 4] if quick else [1, 2, 4, 8, 16], tokens_per_step=[1],
        caches=["none"] if quick else ["none", "dual"], graphs=None, timing="generation", warmup_steps=4,
        timed_steps=8, reference="on", ceilings=True, quick=quick, seed=0, progress=args.progress,
        model=getattr(args, "model", None))
    for name in ("gen_lengths", "block_length", "prompt_len", "batches", "tokens_per_step", "caches", "graphs",
                 "timing", "warmup_steps", "timed_steps", "seed"):
        setattr(opts, name, given(args, name, getattr(opts, name)))
    if getattr(args, "reference", None) is not None:
        opts.reference = "on" if args.reference else "off"
    if opts.model:  # a checkpoint's own weights; its folder's (or Hub) name stands in the rows' preset column
        from ...hub import parse_hub_name
        from ...loader import resolve_model_path

        folder = resolve_model_path(opts.model)
        opts.preset = opts.model if parse_hub_name(opts.model) else folder.name
    else:
        from_name(opts.preset)  # an unknown preset is a ValueError before anything runs
    if opts.warmup_steps < 1 or opts.timed_steps < 1:
        raise ValueError("--warmup-steps and --timed-steps must be at least 1.")
    return opts


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """``diffuse-engine bench engine``: rows appended to ``out/engine.csv``."""
    return measure_all(settings(args), out / "engine.csv")


def _build(opts: argparse.Namespace, device: torch.device):
    t0 = time.perf_counter()
    if getattr(opts, "model", None):
        from ...loader import load_model

        model, config, _ = load_model(opts.model, device=device, dtype=DTYPES[opts.dtype])
    else:
        config = from_name(opts.preset).config
        model = build_model(config, device=device, dtype=DTYPES[opts.dtype]).init_random_(
            opts.seed, on_device=opts.init == "on-device")
    print(f"# {opts.preset}: {config.num_parameters() / 1e6:.1f}M parameters, {opts.dtype} on {device}, "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    ceilings = None
    if opts.ceilings:
        small = opts.quick and device.type == "cpu"
        ceilings = measure_ceilings(device, *((64 << 20, 512) if small else ()))
        print(f"# ceilings: copy {ceilings['bandwidth_gbs']:.0f} GB/s, matmul {ceilings['peak_tflops']:.1f} "
              f"TFLOP/s ({ceilings['matmul_dtype']})", flush=True)
    # warm-up: kernels, allocator
    LLM.from_model(model, engine_config=engine_config(1, opts.prompt_len + opts.block_length, None)).generate(
        random_prompts(config, 1, opts.prompt_len, 99),
        SamplingParams(gen_length=opts.block_length, block_length=opts.block_length, steps=2))
    return model, ceilings


def measure_all(opts: argparse.Namespace, csv_path: Path | None) -> list[dict]:
    """Run every configuration of ``opts`` (the script's flags, or :func:`settings`), appending each row to
    ``csv_path`` as it is measured (None: no file). A configuration that fails is reported and the others still
    run; then :class:`PartialFailure` is raised."""
    device = torch.device(opts.device)
    model, ceilings = _build(opts, device)
    todo, notes = configurations(opts, device)
    for note in notes:
        print(f"# {note}", flush=True)
    if opts.reference == "on" and opts.timing == "generation" and reference.oracle() is None:
        print(f"# {reference.unavailable_reason()}", flush=True)
    base = stamp(device)
    rows, failures = [], []
    for gen_length, cache, graphs, batch, tps in progress(todo, total=len(todo), desc="engine",
                                                          show=getattr(opts, "progress", None)):
        label = f"gen {gen_length} cache {cache} graphs {graphs or 'default'} batch {batch} tokens/step {tps}"
        try:
            row = _configuration(opts, model, ceilings, device, (gen_length, cache, graphs, batch, tps))
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not cost the others
            print(f"FAILED {label}: {type(exc).__name__}: {exc}", flush=True)
            failures.append(label)
            continue
        row = {**base, **row}
        row = {**row, **{c: row.get(c) for c in EXTRA_COLUMNS}}
        rows.append(row)
        print_table([row], [c for c in row if c not in base and row[c] is not None])
        if csv_path is not None:  # row by row: a run stopped early keeps what it measured
            written = append_csv(csv_path, [row], union=True)
        sys.stdout.flush()
    if rows and csv_path is not None:
        print(f"# appended {len(rows)} rows to {written}")
    if failures:
        raise PartialFailure(f"{len(failures)} configuration(s) failed: {'; '.join(failures)}", rows)
    return rows


def _configuration(opts, model, ceilings, device, point) -> dict:
    """One configuration's row (without the stamp)."""
    gen_length, cache, graphs, batch, tps = point
    config = model.config
    steps = gen_length // tps
    params = SamplingParams(gen_length=gen_length, block_length=opts.block_length, steps=steps, cache=cache)
    check_window(opts, params, cache)
    prompts = random_prompts(config, batch, opts.prompt_len, opts.seed + batch)
    llm = LLM.from_model(model, engine_config=engine_config(batch, opts.prompt_len + gen_length, graphs))
    try:
        m = measure(llm, prompts, params, opts, device)
    finally:
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed_steps = len(m["steps_timed"])
    items = schedule_items(config, params, opts.prompt_len, m["steps_timed"])
    row = {"preset": opts.preset, "dtype": opts.dtype, "batch": batch, "cache": cache,
           "cuda_graphs": graphs or "default", "timing": opts.timing, "prompt_len": opts.prompt_len,
           "gen_length": gen_length, "block_length": opts.block_length, "steps": steps, "tokens_per_step": tps,
           "warmup_steps": opts.warmup_steps if opts.timing == "steady" else 0, "timed_steps": timed_steps,
           "nfe": m["nfe"], "tokens_per_forward": round(gen_length / m["nfe"], 3) if m["nfe"] else tps,
           "engine_s": round(m["seconds"], 4), "engine_tok_s": round(m["tokens"] / m["seconds"], 2),
           "step_ms": round(1e3 * m["seconds"] / timed_steps, 3),
           "query_tokens": round(sum(q for q, _, _ in items) / len(items), 1),
           "context_tokens": round(sum(c for _, c, _ in items) / len(items), 1)}
    if ceilings:
        dtype_bytes = torch.tensor([], dtype=DTYPES[opts.dtype]).element_size()
        f = window_floor(config, items, batch, dtype_bytes, ceilings)
        row.update({"floor_ms": significant(1e3 * f["floor_s"], 5),
                    "pct_of_floor": significant(100 * f["floor_s"] * timed_steps / m["seconds"], 3),
                    "bound": f["bound"], "memory_floor_ms": significant(1e3 * f["memory_s"], 5),
                    "compute_floor_ms": significant(1e3 * f["compute_s"], 5)})
    if opts.timing == "generation" and opts.reference == "on" and batch == 1 and reference.oracle() is not None:
        sync(device)
        t = time.perf_counter()
        ref_tokens = run_reference(model, prompts[0], params, config.mask_token_id)
        sync(device)
        ref_s = time.perf_counter() - t
        same = sum(a == b for a, b in zip(ref_tokens, m["outputs"][0].token_ids, strict=True))
        row.update({"reference_s": round(ref_s, 4), "reference_tok_s": round(gen_length / ref_s, 2),
                    "speedup": round(ref_s / m["seconds"], 2), "identical_tokens": f"{same}/{gen_length}"})
    return row
