"""The command line of the kernel benchmark scripts (``benchmarks/bench_attention.py``, ``bench_sample.py``,
``bench_lm_head.py``, ``bench_noise.py``): thin entry points over ``profile`` (:mod:`.profile`) that keep their flags
(``--quick``, ``--device``, ``--csv FILE``; ``bench_noise.py`` also ``--no-csv`` and ``--cpu-only``) and the columns
their earlier CSVs had (``provider``, ``ms``, ``ms_p20``, ``ms_p80``, ``baseline``, ``ratio``; attention rows
``op`` = full / block_causal / block_over_cache and ``ratio_vs_sdpa``), next to profile's own. Only the timed
(correct) variants are written; the table lists every variant, with the reason for those not run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import common
from .profile import op_rows

BASELINES = {"attention": {"full": "sdpa", "block_causal": "sdpa", "block_over_cache": "sdpa-contiguous"}}


def legacy_columns(row: dict) -> dict:
    """``row`` with the columns of the scripts' earlier CSVs added."""
    out = {**row, "provider": row["variant"], "ms": row["time_ms"], "ms_p20": row["p20_ms"],
           "ms_p80": row["p80_ms"], "ratio": row.get("speedup")}
    if row["op"] == "attention":
        out["op"] = "block_over_cache" if ",P=" in row["shape"] else ("block_causal" if "block=" in row["shape"]
                                                                      else "full")
    elif row["op"] == "noise":
        out["op"] = row["shape"].split("kind=")[-1]
    return out


def _ratio_vs_sdpa(rows: list[dict]) -> None:
    for r in rows:
        base = BASELINES["attention"][r["op"]]
        ref = next((x for x in rows if x["shape"] == r["shape"] and x["variant"] == base), None)
        r["ratio_vs_sdpa"] = ref["time_ms"] / r["time_ms"] if ref else ""


def main(doc: str, ops: tuple[str, ...], default_csv: Path, argv: list[str] | None = None,
         noise_flags: bool = False) -> int:
    """Parse the script's flags, profile ``ops`` on the device's default grid, print the table and append the timed
    rows to the CSV."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=Path, default=default_csv, help=f"CSV to append to (default {default_csv})")
    if noise_flags:
        parser.add_argument("--no-csv", action="store_true", help="print only")
        parser.add_argument("--cpu-only", action="store_true", help="profile the CPU even when a GPU is visible")
    args = parser.parse_args(argv)
    if getattr(args, "cpu_only", False):
        args.device = "cpu"
    profile_args = argparse.Namespace(device=args.device, dtype=None, quick=args.quick, shape=None, variants=None,
                                      model=None, preset=None, progress=None, warmup=None, reps=None)
    rows = [legacy_columns(r) for op in ops for r in op_rows(op, profile_args)]
    common.print_table(rows, ["op", "variant", "shape", "time_ms", "gbps", "tflops", "pct_floor", "speedup", "error",
                              "correct", "status"])
    timed = [r for r in rows if r.get("time_ms")]
    if "attention" in ops:
        _ratio_vs_sdpa(timed)
    if not getattr(args, "no_csv", False):
        written = common.append_csv(args.csv, timed, union=True)
        print(f"appended {len(timed)} rows to {written}")
    return 1 if any(r.get("correct") is False for r in rows) else 0
