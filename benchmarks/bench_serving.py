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

The work is done in :mod:`diffuse_engine.bench.suites.serving` (also ``diffuse-engine bench serving``).

    python benchmarks/bench_serving.py             # ~30 s on the CPU; appends to ./bench-results/serving_cpu.csv
    python benchmarks/bench_serving.py --quick     # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

from diffuse_engine.bench.common import OUT, append_csv, print_table  # noqa: E402
from diffuse_engine.bench.suites.options import floats, ints  # noqa: E402
from diffuse_engine.bench.suites.serving import COLUMNS, measure_all  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure_all(args)
    print_table(rows, COLUMNS)
    path = args.out / "serving_cpu.csv"
    append_csv(path, rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
