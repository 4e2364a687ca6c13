"""Serving benchmark: continuous vs static batching on the engine, under seeded Poisson arrival traces.

One process, one model; for each rate of ``--rate`` (default 60, 150 and 300 requests/s: light load to
saturation on two CPU cores), both modes in turn on the same trace. A driver loop plays the trace on the wall clock
and calls ``engine.step()`` between arrivals:

- ``continuous``: every request whose arrival time has passed is added at once (it joins the running batch at
  the next step, up to ``--max-batch`` sequences; the engine queues the rest);
- ``static``: requests are added only when the engine has nothing unfinished; then every request that has
  arrived joins, up to ``--max-batch``, and the batch runs to its end.

Requests: the shipped ``addition`` model on held-out sums of its task (its 6-token canvas; each request's step
count is drawn from ``--steps``, e.g. 6,3,2: one, two or three tokens per step), or a random-weight preset
(``--model llada-tiny``) with random prompts. Reported per mode: output-token throughput over the run (first
arrival to last finish), p50 / p99 latency (arrival to finish), mean batch (sequences per step), accuracy (task
models), and whether both modes gave every request the same tokens (batch invariance).

    python benchmarks/bench_serving.py             # ~30 s on the CPU; appends to ./bench-results/serving_cpu.csv
    python benchmarks/bench_serving.py --quick     # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffuse_engine.bench.common import OUT, append_csv, print_table, stamp  # noqa: E402

from diffuse_engine import LLM, SamplingParams  # noqa: E402
from diffuse_engine.engine import EngineConfig  # noqa: E402
from diffuse_engine.models import build_model  # noqa: E402
from diffuse_engine.presets import PRESETS, from_name  # noqa: E402
from diffuse_engine.quality.tasks import get_task  # noqa: E402

MODES = ("continuous", "static")
COLUMNS = ["target_rate_rps", "mode", "requests", "rate_rps", "duration_s", "tokens_per_s", "p50_s", "p99_s",
           "mean_batch", "steps", "accuracy", "identical_outputs"]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="addition", help="a shipped task model (addition) or a preset (llada-tiny)")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--rate", type=floats, default=[60.0, 150.0, 300.0],
                    help="mean arrivals per second (Poisson); a comma-separated list runs one trace per rate")
    ap.add_argument("--max-batch", type=int, default=64, help="sequences per step, both modes")
    ap.add_argument("--steps", type=ints, default=[6, 3, 2], help="step counts, drawn per request")
    ap.add_argument("--gen-length", type=int, default=32, help="canvas of random-model requests")
    ap.add_argument("--block-length", type=int, default=16, help="block of random-model requests")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens of random-model requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="few requests (CI smoke run)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"folder of serving_cpu.csv (default {OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_requests, args.rate = 24, [200.0]
    if args.num_requests < 1 or not args.rate or min(args.rate) <= 0 or args.max_batch < 1 or not args.steps:
        raise ValueError("--num-requests and --max-batch must be positive, --rate > 0 and --steps non-empty.")
    return args


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


def build(args: argparse.Namespace) -> tuple[LLM, Trace, object | None]:
    """The model and the requests (arrivals at ``args.rate[0]``; :func:`main` re-times them per rate)."""
    rng = random.Random(args.seed + 1)
    arrivals = poisson(args.num_requests, args.rate[0], args.seed)
    if args.model in PRESETS:
        model = build_model(from_name(args.model).config).init_random_(args.seed).eval()
        llm = LLM.from_model(model, engine_config=EngineConfig(max_num_seqs=args.max_batch))
        gen = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, 256, (args.num_requests, args.prompt_len), generator=gen).tolist()
        blocks = args.gen_length // args.block_length
        params = [SamplingParams(gen_length=args.gen_length, block_length=args.block_length,
                                 steps=blocks * max(1, min(args.block_length, rng.choice(args.steps))),
                                 temperature=0.0, seed=i) for i in range(args.num_requests)]
        return llm, Trace(arrivals, prompts, params), None
    llm = LLM(args.model, device="cpu", engine_config=EngineConfig(max_num_seqs=args.max_batch))
    task = get_task(args.model)
    examples = task.test_set(args.num_requests)
    base = llm.default_params()
    params = [llm.default_params(steps=min(base.gen_length, rng.choice(args.steps)), seed=i)
              for i in range(args.num_requests)]
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm, trace, task = build(args)
    warm = min(8, len(trace.prompts))  # first-step allocations and lazy imports, outside the timed runs
    llm.generate(trace.prompts[:warm], trace.params[:warm])
    base = stamp("cpu")
    rows = []
    for rate in args.rate:
        trace.arrivals = poisson(args.num_requests, rate, args.seed)
        runs, pair = {}, []
        for mode in MODES:
            runs[mode] = serve(llm, trace, mode, args.max_batch)
            pair.append({**base, "model": args.model, "max_batch": args.max_batch, "target_rate_rps": rate,
                         "steps_mix": ":".join(map(str, args.steps)), "seed": args.seed,
                         "threads": torch.get_num_threads(), **summarize(llm, trace, task, mode, runs[mode])})
        same = runs["continuous"]["outputs"] == runs["static"]["outputs"]
        for r in pair:
            r["identical_outputs"] = same
        rows += pair
    print_table(rows, COLUMNS)
    for cont, stat in zip(rows[::2], rows[1::2], strict=True):
        print(f"rate {cont['target_rate_rps']:g}/s, continuous / static: throughput "
              f"x{cont['tokens_per_s'] / stat['tokens_per_s']:.2f}, p50 x{cont['p50_s'] / stat['p50_s']:.2f}, "
              f"p99 x{cont['p99_s'] / stat['p99_s']:.2f}")
    path = args.out / "serving_cpu.csv"
    append_csv(path, rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
