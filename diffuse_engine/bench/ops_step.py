"""``profile step``: one whole engine step (``Engine.step``: forward, LM head, sampling, commit) per variant.

Shape ``B=1,P=64,G=256,K=32``: B requests of P-token random prompts generating G tokens in blocks of K, under
``--cache`` / ``--policy`` / ``--threshold``. Variants: ``eager`` (no CUDA graphs; the reference) and ``graphs``
(``EngineConfig.cuda_graphs``, CUDA only). Correctness is exact: the canvases after each of the first
:data:`CHECK_STEPS` steps equal the eager engine's. Timing: ``--reps`` steady steps (inside a block, past its first
step) after warm-up, each timed on its own (median, p20, p80). The floor is :func:`common.step_cost` of a steady
step against the measured ceilings (weights + cached K/V read, or FLOPs). Models are random weights of ``--preset``
(default llada-8b on CUDA, llada-tiny on the CPU) or the checkpoint ``--model DIR``. ``--trace DIR`` writes the
torch.profiler Chrome trace of a few steady steps per shape and variant and prints their breakdown by category;
``--breakdown`` does the same without keeping the trace, and both attach the breakdown's rows to the variant's row
(``row["breakdown"]``: kind = step, category, idle, idle_part, kernel; written to ``--csv`` after the timing rows).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..progress import progress
from . import common
from .step_profile import Stepper, reach_steady, start_engine, trace_steps
from .step_trace import breakdown_rows
from .variants import OpSpec

CHECK_STEPS = 3
KEYS = {"B": None, "P": 64, "G": None, "K": 32}
SHAPE_SPEC = OpSpec(name="step", keys=KEYS, grid=lambda config, device, quick: [], make=None, reference=None,
                    plain=None, error=None, cost=None)


def _check(shape: dict) -> None:
    if shape["B"] < 1 or shape["K"] < 1 or shape["G"] < 2 * shape["K"] or shape["G"] % shape["K"]:
        raise ValueError(f"step needs B >= 1 and G a multiple of K with at least two blocks; got {shape}.")


SHAPE_SPEC.check_shape = _check


def grid(device: torch.device, quick: bool) -> list[dict]:
    """The default shapes: batch 1 and 32 of the LLaDA-8B suite shape on CUDA, tiny ones on the CPU."""
    if device.type == "cuda":
        shapes = [{"B": 1, "P": 64, "G": 256, "K": 32}, {"B": 32, "P": 64, "G": 256, "K": 32}]
    else:
        shapes = [{"B": 1, "P": 8, "G": 64, "K": 16}, {"B": 4, "P": 8, "G": 64, "K": 16}]
    return shapes[: 1 if quick else None]


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from .profile_setup import model_config

    if getattr(args, "model", None):
        from ..loader import load_model

        model = load_model(args.model, device=device, dtype=dtype)
        return model, model.config
    from ..models import build_model

    config = model_config(args, device)
    return build_model(config, device=device, dtype=dtype).init_random_(0, on_device=True), config


def _canvases(engine, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        out += [list(o.canvas) for o in sorted(engine.step(), key=lambda o: o.request_id)]
    return out


def _floor_ms(config, shape: dict, cache: str, dtype: torch.dtype, ceil: dict) -> float:
    recompute, cached = common.cache_step_tokens(cache, shape["P"], shape["G"], shape["K"], 0, refresh=False)
    cost = common.step_cost(config, [recompute] * shape["B"], shape["B"] * shape["K"], torch.finfo(dtype).bits // 8,
                            [cached] * shape["B"])
    return 1e3 * max(common.roofline_seconds(cost, ceil))


def _time_steady(stepper: Stepper, reps: int) -> tuple[float, float, float] | None:
    times = []
    for _ in range(3 * reps):
        t = time.perf_counter()
        steady = stepper.step()
        if steady:
            times.append(1e3 * (time.perf_counter() - t))
        if len(times) == reps:
            break
    if not times:
        return None
    times.sort()
    return times[len(times) // 2], times[len(times) // 5], times[(4 * len(times)) // 5]


def _variant_row(name: str, graphs: str, ctx: dict, expected: list | None) -> tuple[dict, list]:
    """Run one variant at one shape: check its first steps against ``expected`` (None: it is the reference), then
    time steady steps and trace a few when asked."""
    shape, args, device = ctx["shape"], ctx["args"], ctx["device"]
    engine = start_engine(ctx["model"], ctx["config"], shape["B"], ctx["params"], graphs, shape["P"], 0)
    row = {**ctx["base"], "op": "step", "variant": name, "shape": ctx["label"], "dtype": str(ctx["dtype"])[6:],
           "cache": args.cache, "policy": args.policy, "threshold": args.threshold, "time_ms": None, "p20_ms": None,
           "p80_ms": None, "error": None, "mismatches": None, "correct": None, "status": "", "note": ""}
    stepper = Stepper(engine, shape["B"], device)
    try:
        got = _canvases(engine, CHECK_STEPS)
        bad = 0 if expected is None else sum(a != b for x, y in zip(got, expected, strict=True)
                                             for a, b in zip(x, y, strict=True))
        row.update(error=float(bad), mismatches=bad, correct=bad == 0,
                   note="reference" if expected is None else "")
        if not row["correct"]:
            row["status"] = f"wrong: {bad} tokens differ from the eager engine's"
            return row, got
        reach_steady(stepper, 1, shape["K"])
        timing = _time_steady(stepper, getattr(args, "reps", None) or 5)
        if timing is None:
            row["status"] = "no steady step to time"
            return row, got
        row.update(time_ms=timing[0], p20_ms=timing[1], p80_ms=timing[2], status="ok", floor_ms=ctx["floor_ms"],
                   pct_floor=100 * ctx["floor_ms"] / timing[0])
        if getattr(args, "trace", None) or getattr(args, "breakdown", False):
            row["breakdown"] = _breakdown(stepper, name, row, ctx)
    except RuntimeError as exc:
        row.update(correct=row["correct"] if row["correct"] is not None else False,
                   status=f"failed: {(str(exc).splitlines() or [''])[0][:160]}")
        return row, []
    finally:
        for rid in list(stepper.block):
            engine.abort(rid)
    return row, got


def _breakdown(stepper: Stepper, name: str, row: dict, ctx: dict) -> list[dict]:
    """Trace two steady steps (into ``--trace`` or a temporary folder), print the breakdown, return its rows."""
    args = ctx["args"]
    trace = getattr(args, "trace", None)
    file = f"step_{name}_{ctx['label'].replace(',', '_').replace('=', '')}.json"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace or tmp) / file
        b = trace_steps(stepper, 2, path)
    _print_breakdown(b, row, path if trace else None, args)
    keep = {k: row.get(k) for k in ("date", "commit", "device", "op", "variant", "shape", "dtype", "cache", "policy",
                                    "threshold")}
    preset = getattr(args, "preset", None) or getattr(args, "model", None) or ""
    return [{**keep, "preset": preset, "batch": ctx["shape"]["B"], "source": b["source"],
             "step_ms": round(b["span_us"] / 1e3, 4), "step_ms_unprofiled": row["time_ms"], **r}
            for r in breakdown_rows(b)]


def _print_breakdown(b: dict, row: dict, path: Path | None, args: argparse.Namespace) -> None:
    out = sys.stderr if getattr(args, "json", False) else sys.stdout
    where = f"; trace {path}" if path is not None else ""
    print(f"# {row['variant']} {row['shape']}: {b['span_us'] / 1e3:.3f} ms per profiled step ({b['source']}){where}",
          file=out)
    for r in breakdown_rows(b, top=8):
        if r["kind"] != "step":
            print(f"    {r['kind']:<9} {r['name'][:70]:<70} {r['ms']:>10.4f} ms {r['pct_of_step']:>6.1f} %", file=out)


def step_rows(args: argparse.Namespace) -> list[dict]:
    """The rows of ``profile step``: per shape, eager then (on CUDA, when the engine has the option) graphs."""
    from ..sampling_params import SamplingParams
    from .profile_setup import ceilings, device_and_dtype, parse_shape

    device, dtype = device_and_dtype(args)
    shapes = [parse_shape(SHAPE_SPEC, s) for s in args.shape] if getattr(args, "shape", None) else \
        grid(device, args.quick)
    model, config = _model(args, device, dtype)
    ceil, base = ceilings(device, args.quick), common.stamp(device)
    variants = [("eager", "off")] + ([("graphs", "on")] if device.type == "cuda" and common.graphs_option() else [])
    wanted = set(args.variants.split(",")) if getattr(args, "variants", None) else None
    rows = []
    for shape in progress(shapes, total=len(shapes), desc="profile step", show=getattr(args, "progress", None)):
        params = SamplingParams(gen_length=shape["G"], block_length=shape["K"], cache=args.cache, policy=args.policy,
                                threshold=args.threshold, seed=0)
        label = ",".join(f"{k}={shape[k]}" for k in KEYS)
        ctx = {"shape": shape, "args": args, "device": device, "dtype": dtype, "model": model, "config": config,
               "params": params, "base": base, "label": label,
               "floor_ms": _floor_ms(config, shape, args.cache, dtype, ceil)}
        expected, mine = None, []
        for name, graphs in variants:
            if wanted is not None and name not in wanted and name != "eager":
                continue
            row, got = _variant_row(name, graphs, ctx, expected)
            expected = got if expected is None else expected
            mine.append(row)
        if device.type != "cuda":
            mine.append({**base, "op": "step", "variant": "graphs", "shape": label, "time_ms": None,
                         "correct": None, "status": "unavailable: needs CUDA"})
        for r in mine:
            if r.get("time_ms") and mine[0].get("time_ms"):
                r.update(baseline="eager", speedup=mine[0]["time_ms"] / r["time_ms"])
        rows += mine
    return rows
