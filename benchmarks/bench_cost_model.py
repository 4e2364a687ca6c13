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

The work is done in :mod:`diffuse_engine.bench.suites.cost_model` (also ``diffuse-engine bench cost-model``).

    python benchmarks/bench_cost_model.py            # ~2 min on one core; ./bench-results/cost_model/
    python benchmarks/bench_cost_model.py --quick    # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

from diffuse_engine.bench.common import OUT, append_csv, print_table  # noqa: E402
from diffuse_engine.bench.plots import predicted_vs_measured  # noqa: E402
from diffuse_engine.bench.suites.cost_model import COLUMNS, measure_all, summarize, title  # noqa: E402
from diffuse_engine.bench.suites.options import DTYPES, ints  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, ceilings = measure_all(args)
    print(f"ceilings: {ceilings}")
    print_table(rows, COLUMNS)
    summarize(rows)
    append_csv(args.out / "cost_model_cpu.csv", rows)
    predicted_vs_measured(rows, args.out / "cost_model_cpu.png", title(rows, ceilings))
    print(f"appended {len(rows)} rows to {args.out / 'cost_model_cpu.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
