"""The serving suite: continuous vs static batching on the engine, under seeded Poisson arrival traces (see
``benchmarks/bench_serving.py`` for the two modes). One model; for each rate both modes in turn on the same trace,
a driver loop playing the trace on the wall clock and calling ``engine.step()`` between arrivals. Reported per
mode: output-token throughput, p50 / p99 latency, mean batch, accuracy (task models), and whether both modes gave
every request the same tokens (batch invariance).

``diffuse-engine bench serving``: the shipped ``addition`` model (``--model`` / ``--preset`` another); ``--quick``
plays 24 requests at 200/s. Rows go to ``<out>/serving.csv``."""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...engine import EngineConfig
from ...entrypoints.llm import LLM
from ...models import build_model
from ...presets import PRESETS, from_name
from ...progress import progress
from ...quality.tasks import get_task
from ...sampling_params import SamplingParams
from ..common import append_csv, stamp
from .options import given, resolve_device

MODES = ("continuous", "static")
COLUMNS = ["target_rate_rps", "mode", "requests", "rate_rps", "duration_s", "tokens_per_s", "p50_s", "p99_s",
           "mean_batch", "steps", "accuracy", "identical_outputs"]
KEYS = {"serving.csv": (("model", "max_batch", "target_rate_rps", "steps_mix", "seed", "mode"), "p50_s")}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """The serving benchmark's options from ``diffuse-engine bench`` flags."""
    quick = bool(args.quick)
    model = getattr(args, "model", None) or args.preset or "addition"
    if model in PRESETS:
        from_name(model)
    return argparse.Namespace(
        model=model, device=str(resolve_device(args.device or "cpu")), num_requests=24 if quick else 300,
        rate=[200.0] if quick else [60.0, 150.0, 300.0], max_batch=max(given(args, "batches", [64])),
        steps=[6, 3, 2], gen_length=given(args, "gen_lengths", [32])[0], block_length=given(args, "block_length", 16),
        prompt_len=given(args, "prompt_len", 16), seed=given(args, "seed", 0), threads=None, progress=args.progress)


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """``diffuse-engine bench serving``: rows appended to ``out/serving.csv``."""
    rows = measure_all(settings(args))
    append_csv(out / "serving.csv", rows, union=True)
    return rows


@dataclass(slots=True)
class Trace:
    """The requests of one run: arrival offsets (seconds), prompts, parameters, and (task models) the task's
    prompt strings for checking answers."""

    arrivals: list[float]
    prompts: list[list[int]]
    params: list[SamplingParams]
    texts: list[str] = field(default_factory=list)


def poisson(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (seconds) of ``n`` requests at ``rate`` per second, seeded."""
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals


def build(opts: argparse.Namespace) -> tuple[LLM, Trace, object | None]:
    """The model and the requests (arrivals at ``opts.rate[0]``; :func:`measure_all` re-times them per rate)."""
    rng = random.Random(opts.seed + 1)
    arrivals = poisson(opts.num_requests, opts.rate[0], opts.seed)
    device = getattr(opts, "device", "cpu")
    if opts.model in PRESETS:
        model = build_model(from_name(opts.model).config, device=device).init_random_(opts.seed).eval()
        llm = LLM.from_model(model, engine_config=EngineConfig(max_num_seqs=opts.max_batch))
        gen = torch.Generator().manual_seed(opts.seed)
        prompts = torch.randint(0, 256, (opts.num_requests, opts.prompt_len), generator=gen).tolist()
        blocks = opts.gen_length // opts.block_length
        params = [SamplingParams(gen_length=opts.gen_length, block_length=opts.block_length,
                                 steps=blocks * max(1, min(opts.block_length, rng.choice(opts.steps))),
                                 temperature=0.0, seed=i) for i in range(opts.num_requests)]
        return llm, Trace(arrivals, prompts, params), None
    llm = LLM(opts.model, device=device, engine_config=EngineConfig(max_num_seqs=opts.max_batch))
    task = get_task(opts.model)
    examples = task.test_set(opts.num_requests)
    base = llm.default_params()
    params = [llm.default_params(steps=min(base.gen_length, rng.choice(opts.steps)), seed=i)
              for i in range(opts.num_requests)]
    prompts = [llm.tokenizer.encode(ex.prompt) for ex in examples]
    return llm, Trace(arrivals, prompts, params, [ex.prompt for ex in examples]), task


def serve(llm: LLM, trace: Trace, mode: str, max_batch: int) -> dict:
    """Play ``trace`` on the wall clock in ``mode``; returns finish offsets, outputs and batch sizes."""
    engine = llm.engine
    n = len(trace.prompts)
    finish: dict[int, float] = {}
    outputs: dict[int, list[int]] = {}
    batches: list[int] = []
    nxt = 0
    t0 = time.perf_counter()
    while len(finish) < n:
        now = time.perf_counter() - t0
        if mode == "continuous" or not engine.has_unfinished():
            limit = n if mode == "continuous" else min(n, nxt + max_batch)
            while nxt < limit and trace.arrivals[nxt] <= now:
                engine.add_request(trace.prompts[nxt], trace.params[nxt], f"{mode}-{nxt}")
                nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, trace.arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        step = engine.step()
        batches.append(len(step))
        done = time.perf_counter() - t0
        for out in step:
            if out.finished:
                i = int(out.request_id.rsplit("-", 1)[1])
                finish[i] = done
                outputs[i] = out.output.token_ids
    return {"finish": finish, "outputs": outputs, "batches": batches}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(llm: LLM, trace: Trace, task, mode: str, run: dict) -> dict:
    """One mode's row: throughput, latency percentiles, mean batch, accuracy."""
    n = len(trace.prompts)
    lat = [run["finish"][i] - trace.arrivals[i] for i in range(n)]
    tokens = sum(p.gen_length for p in trace.params)
    duration = max(run["finish"].values()) - trace.arrivals[0]
    accuracy = None
    if task is not None:
        cfg = llm.config
        stops = {cfg.eos_token_id, cfg.eot_token_id}
        ok = 0
        for i in range(n):
            toks = run["outputs"][i]
            cut = next((j for j, t in enumerate(toks) if t in stops), len(toks))
            ok += task.check(trace.texts[i], llm.tokenizer.decode(toks[:cut]))
        accuracy = ok / n
    return {"mode": mode, "requests": n, "rate_rps": n / trace.arrivals[-1], "duration_s": duration,
            "tokens": tokens, "tokens_per_s": tokens / duration, "requests_per_s": n / duration,
            "p50_s": percentile(lat, 0.5), "p90_s": percentile(lat, 0.9), "p99_s": percentile(lat, 0.99),
            "mean_latency_s": sum(lat) / n, "mean_batch": sum(run["batches"]) / len(run["batches"]),
            "steps": len(run["batches"]), "accuracy": "" if accuracy is None else accuracy}


def measure_all(opts: argparse.Namespace) -> list[dict]:
    """Both modes at every rate of ``opts`` (the script's flags, or :func:`settings`): one row per (rate, mode)."""
    if opts.num_requests < 1 or not opts.rate or min(opts.rate) <= 0 or opts.max_batch < 1 or not opts.steps:
        raise ValueError("the number of requests and the batch must be positive, rates > 0 and steps non-empty.")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    llm, trace, task = build(opts)
    warm = min(8, len(trace.prompts))  # first-step allocations and lazy imports, outside the timed runs
    llm.generate(trace.prompts[:warm], trace.params[:warm])
    base = stamp(getattr(opts, "device", "cpu"))
    rows = []
    for rate in progress(opts.rate, total=len(opts.rate), desc="serving", show=getattr(opts, "progress", None)):
        trace.arrivals = poisson(opts.num_requests, rate, opts.seed)
        runs, pair = {}, []
        for mode in MODES:
            runs[mode] = serve(llm, trace, mode, opts.max_batch)
            pair.append({**base, "model": opts.model, "max_batch": opts.max_batch, "target_rate_rps": rate,
                         "steps_mix": ":".join(map(str, opts.steps)), "seed": opts.seed,
                         "threads": torch.get_num_threads(), **summarize(llm, trace, task, mode, runs[mode])})
        same = runs["continuous"]["outputs"] == runs["static"]["outputs"]
        for r in pair:
            r["identical_outputs"] = same
        rows += pair
    for cont, stat in zip(rows[::2], rows[1::2], strict=True):
        print(f"rate {cont['target_rate_rps']:g}/s, continuous / static: throughput "
              f"x{cont['tokens_per_s'] / stat['tokens_per_s']:.2f}, p50 x{cont['p50_s'] / stat['p50_s']:.2f}, "
              f"p99 x{cont['p99_s'] / stat['p99_s']:.2f}")
    return rows
