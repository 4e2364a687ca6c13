"""The fused LM head (ops.lm_head_stats: hidden[rows] @ W^T folded into the sampling statistics, logits never
written) against cuBLAS matmul + the fastest unfused post-processing (native row_stats kernel) and + the torch
path.

Floor of one call: max(bytes / measured copy bandwidth, 2 M V D / measured bf16 matmul rate), bytes = the weight
(V D) plus the M hidden rows, in the input dtype. GPU: M in {1, 8, 32, 128, 512, 1024, 4096}, V = 126464,
D = 4096, bf16. CPU: small shapes, the torch path and matmul + C++ twin, as a ratio.

    python benchmarks/bench_lm_head.py [--quick] [--csv PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffuse_engine.bench.common import OUT, bench_main, measure_ceilings, result_row, stamp, timed  # noqa: E402

from diffuse_engine import ops  # noqa: E402
from diffuse_engine.kernels import reference as ref  # noqa: E402

GPU_M = (1, 8, 32, 128, 512, 1024, 4096)


def providers(hidden, weight, args, device):
    rows, temperature, seed, step, pos = args
    out = {"matmul+torch": lambda: ref.sample_and_score(hidden @ weight.T, temperature, seed, step, pos)}
    if ops.native_status()[0] is not None and (device.type == "cuda" or hidden.dtype == torch.float32):
        from diffuse_engine import native

        name = "matmul+cuda" if device.type == "cuda" else "matmul+c++"
        out[name] = lambda: native.row_stats(hidden @ weight.T, *args)
    if device.type == "cuda" and ops.triton_runs(device)[0]:
        from diffuse_engine.kernels.lm_head_stats import lm_head_stats

        out["fused"] = lambda: lm_head_stats(hidden, weight, *args)
    return out


def run(device: torch.device, quick: bool) -> list[dict]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    v, d = (126464, 4096) if gpu else (4097, 64)
    ms = GPU_M if gpu else (1, 16)
    ceil = measure_ceilings(device)
    base = stamp(device)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, d, generator=gen) * d ** -0.5).to(device, dtype)
    result_rows = []
    for m in ms[: 2 if quick else None]:
        hidden = torch.randn(m, d, generator=gen).to(device, dtype)
        args = (torch.arange(m, device=device), torch.ones(m, device=device),
                torch.randint(0, 2**62, (m,), generator=gen).to(device), torch.zeros(m, dtype=torch.int64,
                                                                                      device=device),
                torch.arange(m, dtype=torch.int64, device=device))
        size = weight.element_size()
        nbytes, flops = (v * d + m * d) * size, 2 * m * v * d
        floor_ms = max(nbytes / (ceil["bandwidth_gbs"] * 1e9), flops / (ceil["peak_tflops"] * 1e12)) * 1e3
        results = {name: timed(fn, device, quick) for name, fn in providers(hidden, weight, args, device).items()}
        best_unfused = min(t[0] for name, t in results.items() if name != "fused")
        result_rows += [result_row(base, ceil, "lm_head_stats", f"M={m} V={v} D={d} {str(dtype)[6:]}", name, t,
                                   nbytes=nbytes, flops=flops, floor_ms=floor_ms, baseline="best unfused",
                                   baseline_ms=best_unfused) for name, t in results.items()]
    return result_rows


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, run, OUT / "sampling.csv",
                      ["op", "shape", "provider", "ms", "gbps", "tflops", "pct_floor", "baseline", "ratio"], argv)


if __name__ == "__main__":
    sys.exit(main())
