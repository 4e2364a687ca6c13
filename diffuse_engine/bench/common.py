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

from ..version import __version__

# The source checkout when the package runs from one (an editable install), else site-packages: only used to ask git
# for the commit.
ROOT = Path(__file__).resolve().parent.parent.parent
# Where the benchmarks write unless --out / --csv says otherwise: ./bench-results/ under the current folder, never
# the checkout's committed benchmarks/results/ (runs worth keeping are written there by naming it, then committed).
OUT = Path("bench-results")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def git_commit() -> str:
    """The short commit of the checkout the package runs from, else of the current folder, else ``"unknown"``
    (an installed wheel outside any checkout)."""
    for folder in (ROOT, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def stamp(device: torch.device | str, command: str | None = None) -> dict[str, str]:
    """Columns that every result row carries: date, commit, device, versions, and the command that made the row
    (default: this process's command line)."""
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
        "diffuse_engine": __version__,
        "command": command if command is not None else _command_line(),
    }


def _command_line() -> str:
    program = sys.argv[0]
    if Path(program).name in ("diffuse-engine", "__main__.py"):
        program = "diffuse-engine"
    elif Path(program).is_file():
        program = os.path.relpath(program)
    return " ".join(shlex.quote(a) for a in [program, *sys.argv[1:]])


def append_csv(path: Path, rows: list[dict], *, union: bool = False) -> Path:
    """Append rows to a CSV and return the file written. The columns are the union of the rows' keys (in order
    of first appearance); a row without a column leaves it empty. When the file exists with another header:
    ``union=False`` writes to a new file with a numeric suffix rather than mixing schemas; ``union=True`` rewrites
    the file once with the union of both headers (old columns first) so that benchmarks with different columns
    share one file (the GPU suite's output folder holds at most 8 files)."""
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    candidate, n = path, 1
    while candidate.exists() and not union:
        with candidate.open() as f:
            header = next(csv.reader(f), [])
        if header == fields:
            break
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    if union and candidate.exists():
        with candidate.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header != fields:
                merged = header + [c for c in fields if c not in header]
                if merged != header:
                    old = list(reader)
                    tmp = candidate.with_name(f".{candidate.name}.{os.getpid()}.tmp")
                    with tmp.open("w", newline="") as out:
                        writer = csv.DictWriter(out, fieldnames=merged)
                        writer.writeheader()
                        writer.writerows(old)
                    os.replace(tmp, candidate)
                fields = merged
    new = not candidate.exists()
    with candidate.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return candidate


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as a table of ``columns`` (floats to 4 significant digits): numbers right-aligned, the last
    column left-aligned when it holds text (a status, a note)."""
    if not rows:
        print("(no rows)")
        return
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    texts = [c for c in columns if c == columns[-1] and any(isinstance(r.get(c), str) and r.get(c) for r in rows)]

    def line(cells: dict) -> str:
        return "  ".join(cells[c].ljust(widths[c]) if c in texts else cells[c].rjust(widths[c])
                         for c in columns).rstrip()

    print(line({c: c for c in columns}))
    for r in rows:
        print(line({c: _fmt(r.get(c)) for c in columns}))


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

    from ..engine.calibration import median_seconds

    t_copy = median_seconds(lambda: dst.copy_(src), device, 10)
    t_mm = median_seconds(lambda: torch.mm(a, b), device, 10 if device.type == "cuda" else 3)
    return {"bandwidth_gbs": 2 * n * 4 / t_copy / 1e9, "peak_tflops": 2 * mm ** 3 / t_mm / 1e12,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def step_cost(config, seq_lens: list[int], head_rows: int, dtype_bytes: int,
              context_lens: list[int] | None = None) -> dict[str, float]:
    """FLOPs and minimum bytes of one denoising step. Sequence i recomputes ``seq_lens[i]`` tokens (without a
    cache: its whole sequence) and reads the K and V of ``context_lens[i]`` cached tokens (None: no cache);
    ``head_rows`` rows go through the LM head. Every weight is read once (the embedding table is not streamed,
    only looked up); attention is QK^T and PV of each sequence's recomputed tokens over its cached and recomputed
    keys. Bytes are the weights plus the cached K/V read (activations and writes are left out: a floor)."""
    d, layers = config.hidden_size, config.num_layers
    hd = config.head_dim
    per_layer = d * config.num_heads * hd + 2 * d * config.num_kv_heads * hd + config.num_heads * hd * d \
        + 3 * d * config.intermediate_size
    context_lens = list(context_lens) if context_lens is not None else [0] * len(seq_lens)
    if len(context_lens) != len(seq_lens):
        raise ValueError(f"context_lens has {len(context_lens)} entries for {len(seq_lens)} sequences.")
    tokens = sum(seq_lens)
    flops = 2 * per_layer * layers * tokens
    flops += layers * sum(4 * q * (c + q) * config.num_heads * hd for q, c in zip(seq_lens, context_lens, strict=True))
    flops += 2 * d * config.vocab_size * head_rows
    weight_bytes = (per_layer * layers + d * config.vocab_size) * dtype_bytes
    kv_bytes = 2 * config.num_kv_heads * hd * layers * sum(context_lens) * dtype_bytes
    return {"flops": float(flops), "bytes": float(weight_bytes + kv_bytes)}


def cache_step_tokens(cache: str, prompt_len: int, gen_length: int, block_length: int, block: int,
                      refresh: bool, shift: int = 0) -> tuple[int, int]:
    """(tokens recomputed, cached tokens read) by one sequence in one step of ``block`` (0-based) under
    ``SamplingParams.cache``, as the engine's runner plans it: without a cache, and at a block's first step
    (``refresh``, which rewrites the cache), the whole sequence; ``"prefix"`` the block and everything after it,
    reading the prefix; ``"dual"`` only the block, reading the prefix and the suffix. ``shift``: 1 for models
    with shifted logits (Dream), whose block starts one position earlier."""
    if cache not in ("none", "prefix", "dual"):
        raise ValueError(f"cache must be 'none', 'prefix' or 'dual'; got {cache!r}.")
    length = prompt_len + gen_length
    if cache == "none" or refresh:
        return length, 0
    lo = prompt_len + block * block_length - shift
    hi = length if cache == "prefix" else lo + shift + block_length
    return hi - lo, length - (hi - lo)


def roofline_seconds(cost: dict[str, float], ceilings: dict[str, float]) -> tuple[float, float]:
    """(bytes / copy bandwidth, FLOPs / matmul peak) of a step's ``cost`` with the measured ``ceilings``
    (:func:`measure_ceilings`): the floor is the larger of the two."""
    return (cost["bytes"] / (ceilings["bandwidth_gbs"] * 1e9), cost["flops"] / (ceilings["peak_tflops"] * 1e12))


def graphs_option(config_cls=None) -> bool:
    """Whether the engine's config (``config_cls``, default ``EngineConfig``) has the ``cuda_graphs`` option."""
    import dataclasses

    if config_cls is None:
        from ..engine import EngineConfig as config_cls
    return "cuda_graphs" in {f.name for f in dataclasses.fields(config_cls)}


def engine_config(batch: int, seq_len: int, graphs: str | None = None, config_cls=None):
    """An ``EngineConfig`` that runs every request of a ``batch`` of ``seq_len``-token sequences in every step
    (first come first served; slots, tokens per forward and KV-cache pages for all; no calibration: the scheduler's
    cost model is not consulted). ``graphs``: ``"on"`` / ``"off"`` set ``cuda_graphs=True`` / ``False`` when the
    engine has that option (without it, ``"off"`` is the default config); None leaves the engine's default.
    ``config_cls``: the config class (default ``diffuse_engine.engine.EngineConfig``)."""
    if config_cls is None:
        from ..engine import EngineConfig as config_cls
    page = config_cls().page_size
    kw = {"max_num_seqs": max(1, batch), "max_num_batched_tokens": max(65536, batch * seq_len),
          "kv_cache_tokens": max(page, batch * -(-seq_len // page) * page), "scheduling": "fcfs", "calibrate": False}
    if graphs is not None and graphs_option(config_cls):
        kw["cuda_graphs"] = {"on": True, "off": False}[graphs]
    return config_cls(**kw)


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
    parser.add_argument("--csv", type=Path, default=default_csv, help=f"CSV to append to (default {default_csv})")
    args = parser.parse_args(argv)
    rows = run(torch.device(args.device), args.quick)
    print_table(rows, columns)
    append_csv(args.csv, rows, union=True)
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0
