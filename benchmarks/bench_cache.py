"""Caches and parallel decoding against the reference loop: tokens/s of {no cache, prefix, dual} x {fixed steps,
threshold} on the same machine in one run, with the tokens' agreement with the reference and, for a task model,
the accuracy.

The reference loop is LLaDA's published ``generate()`` (re-expressed in tests/oracles.py: a full forward of the
whole batch per step, logits for every position, one token per step), run on the same batch of equal-length
prompts. Workloads (``model:gen_length:block_length``):
- ``llada-small:256:32``: a LLaDA-shaped random model (LLaDA's 126464-token vocabulary, 34.5M parameters);
- ``addition:256:32``: the shipped addition model on a 256-token canvas (it was trained on its 6-token answer
  canvas, so its accuracy there is not meaningful: this row measures speed);
- ``addition:6:6``: the same model on its own canvas, where accuracy is meaningful.

The work is done in :mod:`diffuse_engine.bench.suites.cache` (also ``diffuse-engine bench cache``).

    python benchmarks/bench_cache.py            # CPU, appends to ./bench-results/cache_cpu.csv
    python benchmarks/bench_cache.py --quick    # seconds; what CI runs
    python benchmarks/bench_cache.py --workloads llada-8b:256:32 --batch 1 --device cuda --init on-device  # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

from diffuse_engine.bench.common import OUT, append_csv, print_table  # noqa: E402
from diffuse_engine.bench.suites.cache import (  # noqa: E402
    COLUMNS,
    DEFAULT_WORKLOADS,
    QUICK_WORKLOADS,
    measure_all,
)
from diffuse_engine.bench.suites.options import DTYPES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help="comma-separated model:gen_length:block_length (model: a preset or a shipped model)")
    ap.add_argument("--batch", type=int, default=2, help="requests per run for random-model workloads")
    ap.add_argument("--task-batch", type=int, default=32, help="requests per run for task-model workloads")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens for random-model workloads")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--init", default="cpu", choices=["cpu", "on-device"], help="where random weights are drawn")
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths (CI smoke run)")
    ap.add_argument("--out", type=Path, default=None, help=f"CSV to append to (default {OUT}/cache_cpu.csv)")
    args = ap.parse_args(argv)
    if args.quick:
        args.workloads, args.batch, args.task_batch, args.prompt_len = QUICK_WORKLOADS, 2, 4, 8
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure_all(args)
    out = args.out or OUT / ("cache_quick.csv" if args.quick else "cache_cpu.csv")
    written = append_csv(out, rows, union=True)
    print_table(rows, COLUMNS)
    print(f"appended {len(rows)} rows to {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
