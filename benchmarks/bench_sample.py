"""Logits -> sampled token + confidence statistics (ops.row_stats): native CUDA kernel, Triton kernel and C++ twin
against the torch path (the engine's reference post-processing: temperature, Gumbel noise, softmax, gathers).

The op reads M x V logits once and writes a few numbers per row: its floor is M * V * bytes / the measured copy
bandwidth (read + write counted, so this is generous to the kernel). Rows share the columns of
bench_lm_head.py, so both append to sampling.csv (default ./bench-results/). GPU: M in {32, 256, 1024} rows of the
LLaDA vocabulary (V = 126464), bf16 logits, triton.testing.do_bench medians. CPU: the C++ twin and the torch path
on small shapes, median of repeats, as a ratio.

    python benchmarks/bench_sample.py [--quick] [--csv PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffuse_engine.bench.common import OUT, bench_main, measure_ceilings, result_row, stamp, timed  # noqa: E402

from diffuse_engine import ops  # noqa: E402
from diffuse_engine.kernels import reference as ref  # noqa: E402

VOCAB = 126464


def inputs(m: int, v: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(m + v)
    logits = (torch.randn(m, v, generator=gen) * 3).to(device, dtype)
    temperature = torch.where(torch.arange(m) % 2 == 0, 0.0, 1.0).to(device)
    seed = torch.randint(0, 2**62, (m,), generator=gen).to(device)
    step = torch.zeros(m, dtype=torch.int64, device=device)
    pos = torch.arange(m, dtype=torch.int64, device=device)
    raw = (torch.arange(m) % 3 == 0).to(device)
    return logits, (torch.arange(m, device=device), temperature, seed, step, pos), raw


def providers(logits, args, raw, device):
    rows, temperature, seed, step, pos = args
    out = {"torch": lambda: ref.sample_and_score(logits, temperature, seed, step, pos, raw_confidence=raw)}
    native_ok = ops.native_status()[0] is not None
    if native_ok and (device.type == "cuda" or logits.dtype == torch.float32):
        from diffuse_engine import native

        out["cuda" if device.type == "cuda" else "c++"] = lambda: native.row_stats(logits, *args, raw_confidence=raw)
    if ops.triton_runs(device)[0] and device.type == "cuda":
        from diffuse_engine.kernels.row_stats import row_stats

        out["triton"] = lambda: row_stats(logits, *args, raw_confidence=raw)
    return out


def step_providers(logits, args, raw, device, requests: int):
    """Stats + commit of one denoising step for ``requests`` requests of M / requests candidate rows each (LLaDA
    top-k, 2 tokens per request): name -> callable."""
    m = logits.shape[0]
    per = m // requests
    canvas = torch.full((m,), 7, dtype=torch.int64, device=device)
    offsets = torch.arange(0, m + 1, per, dtype=torch.int64, device=device)
    index = torch.arange(m, device=device)
    mode = torch.zeros(requests, dtype=torch.int32, device=device)
    count = torch.full((requests,), 2, dtype=torch.int32, device=device)
    zeros = torch.zeros(requests, device=device)
    rows, temperature, seed, step, pos = args

    def torch_step():
        st = ref.sample_and_score(logits, temperature, seed, step, pos, raw_confidence=raw)
        top = st["prob"].view(requests, per).topk(2, dim=1).indices + offsets[:-1, None]
        canvas[top.flatten()] = st["token"][top.flatten()]

    out = {"torch": torch_step}
    native_ok = ops.native_status()[0] is not None and (device.type == "cuda" or logits.dtype == torch.float32)
    if native_ok and hasattr(native_mod(), "commit"):
        native = native_mod()

        def native_step():
            st = native.row_stats(logits, rows, temperature, seed, step, pos, raw_confidence=raw)
            native.commit(ops.CommitBatch(canvas, offsets, index, st["token"], st["prob"], st["neg_entropy"], mode,
                                          count, zeros, zeros, zeros, 0))

        out["cuda" if device.type == "cuda" else "c++"] = native_step
    if device.type == "cuda" and ops.triton_runs(device)[0]:
        from diffuse_engine.kernels.commit import commit
        from diffuse_engine.kernels.row_stats import row_stats

        def triton_step():
            st = row_stats(logits, rows, temperature, seed, step, pos, raw_confidence=raw)
            commit(ops.CommitBatch(canvas, offsets, index, st["token"], st["prob"], st["neg_entropy"], mode, count,
                                   zeros, zeros, zeros, 0), max_rows=per)

        out["triton"] = triton_step
    return out


def native_mod():
    from diffuse_engine import native

    return native


def run(device: torch.device, quick: bool) -> list[dict]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = [(m, VOCAB) for m in (32, 256, 1024)] if gpu else [(4, 4097), (16, 32768)]
    ceil = measure_ceilings(device)
    base = stamp(device)
    rows = []
    for m, v in shapes[: 1 if quick else None]:
        logits, args, raw = inputs(m, v, dtype, device)
        nbytes = m * v * logits.element_size()
        floor_ms = nbytes / (ceil["bandwidth_gbs"] * 1e9) * 1e3
        results = {name: timed(fn, device, quick) for name, fn in providers(logits, args, raw, device).items()}
        rows += [result_row(base, ceil, "row_stats", f"M={m} V={v} {str(dtype)[6:]}", name, t, nbytes=nbytes,
                            floor_ms=floor_ms, baseline="torch", baseline_ms=results["torch"][0])
                 for name, t in results.items()]
        requests = max(1, m // 32)
        results = {name: timed(fn, device, quick) for name, fn in
                   step_providers(logits, args, raw, device, requests).items()}
        rows += [result_row(base, ceil, "row_stats+commit", f"M={m} V={v} B={requests} {str(dtype)[6:]}", name, t,
                            nbytes=nbytes, floor_ms=floor_ms, baseline="torch", baseline_ms=results["torch"][0])
                 for name, t in results.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, run, OUT / "sampling.csv",
                      ["op", "shape", "provider", "ms", "gbps", "pct_floor", "baseline", "ratio"], argv)


if __name__ == "__main__":
    sys.exit(main())
