"""Counter-based noise: native kernel (csrc/noise.cu) and C++ twin (csrc/noise_cpu.cpp) vs the torch reference.

The op writes M x V fp32 values and reads almost nothing, so its floor is store bandwidth: achieved GB/s counts the
M * V * 4 bytes written. On a GPU, M in {32, 256, 1024} rows of the LLaDA vocabulary (V = 126464), timed with
triton.testing.do_bench (median, p20, p80), next to a measured device copy (read + write) as the ceiling. On the
CPU, small shapes, median of time.perf_counter over repeats. Prints a table and appends rows to
./bench-results/noise.csv (--csv PATH to choose).

    python benchmarks/bench_noise.py            # GPU shapes when a GPU is visible, CPU shapes always
    python benchmarks/bench_noise.py --quick    # fewer repeats and shapes (CPU smoke run)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffuse_engine import native, ops
from diffuse_engine.kernels import reference as ref

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = Path("bench-results") / "noise.csv"  # under the current folder, not the checkout
FIELDS = ["device", "commit", "date", "torch", "op", "shape", "provider", "ms", "ms_p20", "ms_p80", "gbps",
          "pct_copy_bw", "ratio_vs_torch"]
VOCAB = 126464
GPU_ROWS = (32, 256, 1024)
CPU_SHAPES = ((4, VOCAB), (32, 4097), (64, 32768))
CPU_SHAPES_QUICK = ((4, 4097), (16, 32768))


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "diffuse_engine"], cwd=ROOT,
                               capture_output=True)
        return out.stdout.strip() + ("+dirty" if dirty.returncode else "")
    except OSError:
        return "unknown"


def keys(rows: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    seed = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g, dtype=torch.int64)
    step = torch.randint(0, 2**32, (rows,), generator=g, dtype=torch.int64)
    pos = torch.randint(0, 2**32, (rows,), generator=g, dtype=torch.int64)
    return seed.to(device), step.to(device), pos.to(device)


def time_gpu(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds: triton's do_bench when available, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(3):
        fn()
    times = []
    for _ in range(10 if quick else 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def time_cpu(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    fn()
    times = []
    for _ in range(5 if quick else 21):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def providers(device: str, rows: int, cols: int, gumbel: bool) -> dict[str, Callable[[], object]]:
    seed, step, pos = keys(rows, device)
    stream = ref.STREAM_SAMPLE
    reference = ref.counter_gumbel if gumbel else ref.counter_uniform
    found: dict[str, Callable[[], object]] = {"torch": lambda: reference(seed, step, pos, stream, cols)}
    if ops.native_status()[0] is not None:
        out = torch.empty((rows, cols), dtype=torch.float32, device=device)
        name = "cuda" if device == "cuda" else "cpp-twin"
        found[name] = lambda: native.counter_noise(seed, step, pos, stream, cols, gumbel=gumbel, out=out)
    return found


def copy_bandwidth(quick: bool) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written), the ceiling a pure store stream can approach."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src), quick)[0]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def run(device: str, shapes: list[tuple[int, int]], quick: bool, ceiling: float | None) -> list[dict]:
    timer = time_gpu if device == "cuda" else time_cpu
    rows_out = []
    for op, gumbel in (("uniform", False), ("gumbel", True)):
        for rows, cols in shapes:
            timings = {name: timer(fn, quick) for name, fn in providers(device, rows, cols, gumbel).items()}
            base = timings["torch"][0]
            for name, (med, p20, p80) in timings.items():
                gbps = rows * cols * 4 / (med * 1e-3) / 1e9
                rows_out.append({
                    "op": op, "shape": f"{rows}x{cols}", "provider": name, "ms": f"{med:.4f}",
                    "ms_p20": f"{p20:.4f}", "ms_p80": f"{p80:.4f}", "gbps": f"{gbps:.1f}",
                    "pct_copy_bw": f"{100 * gbps / ceiling:.1f}" if ceiling else "",
                    "ratio_vs_torch": f"{base / med:.2f}",
                })
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help=f"CSV to append to (default {CSV_PATH})")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU shapes even when a GPU is visible")
    args = parser.parse_args()

    if ops.native_status()[0] is None:
        print(f"native module unavailable ({ops.native_status()[1]}): timing the torch reference only")
    results = []
    if torch.cuda.is_available() and not args.cpu_only:
        name = torch.cuda.get_device_name()
        ceiling = copy_bandwidth(args.quick)
        print(f"{name}: device copy {ceiling:.0f} GB/s (read + write)")
        shapes = [(rows, VOCAB) for rows in (GPU_ROWS[:1] + GPU_ROWS[-1:] if args.quick else GPU_ROWS)]
        results += [{"device": name, **row} for row in run("cuda", shapes, args.quick, ceiling)]
    threads = torch.get_num_threads()
    cpu_shapes = list(CPU_SHAPES_QUICK if args.quick else CPU_SHAPES)
    results += [{"device": f"cpu ({threads} torch threads)", **row} for row in run("cpu", cpu_shapes, args.quick,
                                                                                  None)]

    stamp = {"commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
             "torch": torch.__version__}
    cols = ["device", "op", "shape", "provider", "ms", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "ratio_vs_torch"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in results)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in results:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    if not args.no_csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows({**stamp, **r} for r in results)
        print(f"appended {len(results)} rows to {args.csv}")


if __name__ == "__main__":
    main()
