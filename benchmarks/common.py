"""Shared helpers of the benchmarks: environment stamp, CSV rows, the device's measured ceilings, and the
FLOP / byte counts of one denoising step (the floors of shared/DESIGN.md §5)."""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp(device: torch.device | str) -> dict[str, str]:
    """Columns that every result row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    }


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows (dicts with the same keys) to a CSV, writing the header when the file is new or its header
    differs (then a new file with a numeric suffix is used rather than mixing schemas)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    candidate, n = path, 1
    while candidate.exists():
        with candidate.open() as f:
            header = f.readline().strip().split(",")
        if header == fields:
            break
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    new = not candidate.exists()
    with candidate.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_ceilings(device: torch.device | str, copy_bytes: int = 2 << 30, mm: int = 8192) -> dict[str, float]:
    """Measured device-to-device copy bandwidth (GB/s, bytes read + written) and bf16 (CUDA) / fp32 (CPU)
    matmul rate (TFLOP/s), each the median of several timed repetitions after warm-up, on random data."""
    device = torch.device(device)
    if device.type == "cpu":
        copy_bytes, mm = min(copy_bytes, 256 << 20), min(mm, 1024)
    n = copy_bytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(mm, mm, device=device, dtype=dtype)
    b = torch.randn(mm, mm, device=device, dtype=dtype)

    from diffuse_engine.engine.cost_model import median_seconds

    t_copy = median_seconds(lambda: dst.copy_(src), device, 10)
    t_mm = median_seconds(lambda: torch.mm(a, b), device, 10 if device.type == "cuda" else 3)
    return {"bandwidth_gbs": 2 * n * 4 / t_copy / 1e9, "peak_tflops": 2 * mm ** 3 / t_mm / 1e12,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def step_cost(config, seq_lens: list[int], head_rows: int, dtype_bytes: int) -> dict[str, float]:
    """FLOPs and minimum bytes of one full (no-cache) denoising step over sequences of ``seq_lens`` tokens with
    ``head_rows`` rows through the LM head: every weight is read once (the embedding table is not streamed,
    only looked up); attention is QK^T and PV over each whole sequence."""
    d, layers = config.hidden_size, config.num_layers
    hd = config.head_dim
    per_layer = d * config.num_heads * hd + 2 * d * config.num_kv_heads * hd + config.num_heads * hd * d \
        + 3 * d * config.intermediate_size
    tokens = sum(seq_lens)
    flops = 2 * per_layer * layers * tokens
    flops += layers * sum(4 * s * s * config.num_heads * hd for s in seq_lens)
    flops += 2 * d * config.vocab_size * head_rows
    weight_bytes = (per_layer * layers + d * config.vocab_size) * dtype_bytes
    return {"flops": float(flops), "bytes": float(weight_bytes)}


def timed(fn, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn``: triton.testing.do_bench on CUDA, else time.perf_counter over
    repeats after one warm-up call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25 if quick else 100, rep=100 if quick else 500)
        return med, p20, p80
    fn()
    times = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[len(times) // 5], times[(4 * len(times)) // 5]


def result_row(base: dict, ceil: dict, op: str, shape: str, provider: str, timing: tuple[float, float, float], *,
               nbytes: float, floor_ms: float, baseline: str, baseline_ms: float, flops: float | None = None) -> dict:
    """One kernel-benchmark row: achieved GB/s (and TFLOP/s when ``flops``), % of the floor, ratio to the
    baseline's time, and the measured ceilings the floor came from."""
    med, p20, p80 = timing
    return {**base, "op": op, "shape": shape, "provider": provider, "ms": med, "ms_p20": p20, "ms_p80": p80,
            "gbps": nbytes / med / 1e6, "tflops": flops / med / 1e9 if flops else "", "floor_ms": floor_ms,
            "pct_floor": 100 * floor_ms / med, "baseline": baseline, "ratio": baseline_ms / med,
            "copy_gbs": ceil["bandwidth_gbs"], "matmul_tflops": ceil["peak_tflops"]}


def bench_main(doc: str, run, default_csv: Path, columns: list[str], argv: list[str] | None = None) -> int:
    """The command line every kernel benchmark shares: --quick, --device, --csv; prints a table, appends the
    rows to the CSV."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=Path, default=default_csv)
    args = parser.parse_args(argv)
    rows = run(torch.device(args.device), args.quick)
    print_table(rows, columns)
    append_csv(args.csv, rows)
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0
