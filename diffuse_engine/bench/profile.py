"""``diffuse-engine profile OP``: every variant of one op on the device, each checked against the fp64 reference
(:func:`.variants.judge`) before it is timed; a variant that disagrees is reported wrong and not timed.

Shapes (``--shape``, repeatable, ``KEY=VALUE`` pairs separated by commas; keys without a default are required):

- attention: ``B=1,S=320,H=32,KV=32,D=128`` (bidirectional), ``...,block=32`` (block-causal),
  ``B=16,L=32,P=1024,H=32,KV=32,D=128`` (a block of L queries over P cached tokens);
- row_stats: ``M=256,V=126464``; lm_head_stats: ``M=32,V=126464,D=4096``;
- commit: ``B=32,R=32`` (B requests of R candidate rows); noise: ``M=256,V=126464,kind=gumbel|uniform``;
- moe: ``N=32,D=2048,I=512,E=256,K=8`` (N tokens routed to K of E experts of hidden D, intermediate I);
- step: ``B=1,P=64,G=256,K=32`` (batch, prompt, generation and block lengths; see :mod:`.ops_step`).

Without ``--shape`` the grid comes from ``--model DIR`` / ``--preset`` (default llada-8b on CUDA, llada-tiny on the
CPU). Timing: ``triton.testing.do_bench`` on CUDA (median, p20, p80; it flushes L2), on the CPU the median of
``--reps`` calls after ``--warmup`` calls. The spread [p20, p80] is the noise ``--compare`` uses: a row counts as
faster or slower than the old run's only when the two spreads do not overlap and the times differ by more than
:data:`MIN_CHANGE`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch

from ..progress import progress
from . import common
from .profile_setup import ceilings, device_and_dtype, model_config, parse_shape
from .variants import OpSpec, Unavailable, judge, spec

__all__ = ["MIN_CHANGE", "compare", "measure", "op_rows", "parse_shape", "profile_shape", "run"]

MIN_CHANGE = 0.03
TABLE = ["variant", "shape", "time_ms", "p20_ms", "p80_ms", "gbps", "tflops", "pct_floor", "speedup", "error",
         "correct", "note", "status"]


# ------------------------------------------------------------------------------------------------ timing
def measure(fn, device: torch.device, quick: bool, warmup: int | None, reps: int | None) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn``: do_bench on CUDA; on the CPU ``reps`` timed calls after ``warmup``."""
    if device.type == "cuda":
        return common.timed(fn, device, quick)
    for _ in range(1 if warmup is None else warmup):
        fn()
    times = []
    for _ in range(reps or (3 if quick else 7)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[len(times) // 5], times[(4 * len(times)) // 5]


# ---------------------------------------------------------------------------------------------- one shape
def profile_shape(op: OpSpec, shape: dict, device: torch.device, dtype: torch.dtype, ceil: dict, base: dict,
                  args: argparse.Namespace) -> list[dict]:
    """The rows of every variant of ``op`` at ``shape`` (unavailable, wrong, failed or timed)."""
    from .variants import native_name

    case = op.make(shape, dtype, device)
    reference = op.reference(case)
    plain_err = op.error(op.plain(case), reference)
    nbytes, flops = op.cost(shape, dtype)
    floor_ms = max(nbytes / (ceil["bandwidth_gbs"] * 1e9), flops / (ceil["peak_tflops"] * 1e12)) * 1e3
    wanted = set(args.variants.split(",")) if getattr(args, "variants", None) else None
    rows = []
    for variant in op.variants.values():
        name = native_name(device) if variant.name == "native" else variant.name
        if wanted is not None and name not in wanted and variant.name not in wanted:
            continue
        row = {**base, "op": op.name, "variant": name, "shape": op.label(shape),
               "dtype": op.fixed_dtype or str(dtype)[6:], "time_ms": None, "p20_ms": None, "p80_ms": None,
               "error": None, "plain_error": _num(plain_err[0]), "mismatches": None, "correct": None, "status": "",
               "note": variant.note(device)}
        rows.append(row)
        reason = variant.available(device, dtype, shape)
        if reason:
            row.update(status=f"unavailable: {reason}", note="")
            continue
        try:
            fn = variant.build(case)
            out = fn()
            err = op.error(out, reference)
        except Unavailable as exc:
            row.update(status=f"unavailable: {exc}", note="")
            continue
        except Exception as exc:  # noqa: BLE001 - a variant that raises is reported, the others still run
            first = (str(exc).splitlines() or [""])[0][:160]
            row.update(correct=False, status=f"failed: {type(exc).__name__}: {first}")
            continue
        row.update(error=_num(err[0]), mismatches=err[1], correct=judge(op, err, plain_err))
        if not row["correct"]:
            row["status"] = f"wrong: error {err[0]:.3g} (plain torch {plain_err[0]:.3g}), {err[1]} mismatches"
            continue
        med, p20, p80 = measure(fn, device, args.quick, getattr(args, "warmup", None), getattr(args, "reps", None))
        row.update(time_ms=med, p20_ms=p20, p80_ms=p80, status="ok", gbps=nbytes / med / 1e6,
                   tflops=flops / med / 1e9 if flops else None, floor_ms=floor_ms, pct_floor=100 * floor_ms / med)
    timed = [r for r in rows if r["time_ms"]]
    baseline = timed[0] if timed else None
    for r in timed:
        r.update(baseline=baseline["variant"], speedup=baseline["time_ms"] / r["time_ms"],
                 copy_gbs=ceil["bandwidth_gbs"], matmul_tflops=ceil["peak_tflops"])
    return rows


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def op_rows(name: str, args: argparse.Namespace) -> list[dict]:
    """Every row of ``profile NAME`` for the arguments' device, dtype, shapes (or default grid) and variants."""
    if name == "step":
        from .ops_step import step_rows

        return step_rows(args)
    op = spec(name)
    device, dtype = device_and_dtype(args)
    defaults = {k: v for k, v in op.keys.items() if v is not None}
    shapes = [parse_shape(op, s) for s in args.shape] if getattr(args, "shape", None) else \
        [{k: {**defaults, **s}[k] for k in op.keys} for s in op.grid(model_config(args, device), device, args.quick)]
    ceil = ceilings(device, args.quick)
    base = common.stamp(device)
    rows = []
    for shape in progress(shapes, total=len(shapes), desc=f"profile {name}", show=getattr(args, "progress", None)):
        rows += profile_shape(op, shape, device, dtype, ceil, base, args)
    return rows


# ------------------------------------------------------------------------------------------------ compare
def compare(rows: list[dict], old_csv: Path) -> None:
    """Mark each timed row against the row of ``old_csv`` with the same (op, variant, shape): ``vs_old`` = old time
    / new time, ``change`` = faster / slower when the [p20, p80] spreads do not overlap and the times differ by more
    than :data:`MIN_CHANGE`, else same; rows without a timed counterpart get ``change`` = new."""
    if not old_csv.is_file():
        raise ValueError(f"--compare {old_csv}: no such file.")
    with old_csv.open(newline="") as f:
        old = {(r.get("op"), r.get("variant"), r.get("shape")): r for r in csv.DictReader(f)}
    for r in rows:
        if not r.get("time_ms"):
            continue
        prev = old.get((r["op"], r["variant"], r["shape"]))
        try:
            t, lo, hi = (float(prev[k]) for k in ("time_ms", "p20_ms", "p80_ms"))
        except (TypeError, ValueError, KeyError):
            r["change"] = "new"
            continue
        ratio = t / r["time_ms"]
        apart = hi < r["p20_ms"] or r["p80_ms"] < lo
        r["vs_old"] = ratio
        r["change"] = ("faster" if ratio > 1 else "slower") if apart and abs(ratio - 1) > MIN_CHANGE else "same"


def run(args: argparse.Namespace) -> int:
    """``diffuse-engine profile OP``: print the table (or, with ``--json``, only a JSON list of rows), write
    ``--csv``, mark changes against ``--compare``. Exit status 1 when a variant is wrong or failed, else 0."""
    rows = op_rows(args.op, args)
    breakdown = [b for r in rows for b in r.pop("breakdown", None) or []]  # profile step --trace / --breakdown
    if getattr(args, "compare", None):
        compare(rows, Path(args.compare))
    if getattr(args, "csv", None):
        common.append_csv(Path(args.csv), rows + breakdown, union=True)
    if getattr(args, "json", False):
        print(json.dumps(rows, default=str))
    else:
        columns = TABLE + (["vs_old", "change"] if getattr(args, "compare", None) else [])
        if args.op == "step":
            columns = [c for c in columns if c not in ("gbps", "tflops")]
        common.print_table(rows, [c for c in columns if any(r.get(c) not in (None, "") for r in rows)] or ["variant"])
        if getattr(args, "csv", None):
            extra = f" and {len(breakdown)} breakdown rows" if breakdown else ""
            print(f"wrote {len(rows)} rows{extra} to {args.csv}")
    return 1 if any(r.get("correct") is False for r in rows) else 0
