"""Attention kernels against torch SDPA (and flash-attn when importable), in achieved TFLOP/s or GB/s.

Two shapes (shared/DESIGN.md §6):
- K4, full bidirectional attention (no-cache step, prefill): one sequence of S tokens, 32 heads x 128, bf16.
  FLOPs = 4 S^2 H D (QK^T and PV); compute-bound; the floor is FLOPs / the measured bf16 matmul rate.
- K3, a block of L queries over a cached prefix of P tokens plus the block's own L fresh keys, B requests,
  32 heads x 128 (MHA, LLaDA's layout), paged cache (page_size 64) for the Triton kernel; SDPA reads a
  contiguous [B, H, P + L, D] cache prepared beforehand (its best case). Memory-bound; bytes = K/V of P + L
  tokens per request + q and out; the floor is bytes / the measured copy bandwidth.

On a GPU: the full grid, timed with triton.testing.do_bench (median, p20, p80). On the CPU: the torch
providers on small shapes (so CI exercises this script), median of time.perf_counter repeats; the Triton
providers run there too when TRITON_INTERPRET=1 (slow, correctness only).

    python benchmarks/bench_attention.py [--quick] [--csv PATH]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffuse_engine.bench.common import OUT, bench_main, measure_ceilings, stamp, timed  # noqa: E402

from diffuse_engine import ops  # noqa: E402

GPU_FULL = [(1024,), (4096,)]
GPU_CACHED = [(b, L, p) for b in (1, 16, 64) for L in (32, 64) for p in (1024, 4096)]
CPU_FULL, CPU_CACHED = [(64,), (256,)], [(2, 8, 64), (4, 16, 128)]
PAGE = 64


def triton_runs(device: torch.device) -> bool:
    return ops.triton_runs(device)[0]


def full_providers(q, k, v, device):
    """name -> callable for one [S, H, D] sequence."""
    s = q.shape[0]
    cu = torch.tensor([0, s], dtype=torch.int32, device=device)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    providers = {"sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh)

        providers["sdpa"] = flash
        try:
            from flash_attn import flash_attn_varlen_func

            providers["flash-attn"] = lambda: flash_attn_varlen_func(q, k, v, cu, cu, s, s)
        except ImportError:
            pass
    if triton_runs(device):
        from diffuse_engine.kernels.attention import attention

        providers["triton"] = lambda: attention(q, k, v, cu, s)
    return providers


def cached_inputs(b, L, p, h, kv, d, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(b * 7919 + L * 31 + p)
    # Drawn where they live, in their dtype: the B=64, P=4096 caches hold ~4e9 values, which the CPU would take
    # about half a minute per shape to draw (and the suite has 7 minutes).
    dev_gen = torch.Generator(device=device).manual_seed(b * 7919 + L * 31 + p)

    def rnd(*shape):
        return torch.randn(*shape, generator=dev_gen, device=device, dtype=dtype)

    q, k_new, v_new = rnd(b, L, h, d), rnd(b, L, kv, d), rnd(b, L, kv, d)
    pages_per = math.ceil((p + L) / PAGE)
    k_cache, v_cache = rnd(b * pages_per, PAGE, kv, d), rnd(b * pages_per, PAGE, kv, d)
    block_table = torch.randperm(b * pages_per, generator=gen).view(b, pages_per).to(device, torch.int32)
    cache_lens = torch.full((b,), p, dtype=torch.int32, device=device)
    block_start = cache_lens.clone()
    pos = torch.arange(p, p + L, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = (t.expand(b, L, d).contiguous().to(device) for t in (ang.cos(), ang.sin()))
    # SDPA's best case: the request's keys already contiguous and rotated
    kc = rnd(b, kv, p + L, d)
    vc = rnd(b, kv, p + L, d)
    return (q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin), (kc, vc)


def cached_providers(args, contiguous, device):
    q = args[0]
    kc, vc = contiguous
    qh = q.transpose(1, 2)
    gqa = q.shape[2] != kc.shape[1]
    providers = {"sdpa": lambda: F.scaled_dot_product_attention(qh, kc, vc, enable_gqa=gqa)}
    if triton_runs(device):
        from diffuse_engine.kernels.attention_cached import block_attention_cached

        providers["triton"] = lambda: block_attention_cached(*args)
    return providers


def run(device: torch.device, quick: bool) -> list[dict]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    h, d = (32, 128) if gpu else (4, 64)
    ceil = measure_ceilings(device)
    base = stamp(device)
    rows = []
    for (s,) in (GPU_FULL if gpu else CPU_FULL)[: 1 if quick else None]:
        gen = torch.Generator(device="cpu").manual_seed(s)
        q, k, v = (torch.randn(s, h, d, generator=gen).to(device, dtype) for _ in range(3))
        flops = 4 * s * s * h * d
        floor_ms = flops / (ceil["peak_tflops"] * 1e12) * 1e3
        results = {name: timed(fn, device, quick) for name, fn in full_providers(q, k, v, device).items()}
        for name, (med, p20, p80) in results.items():
            rows.append({**base, "op": "full", "shape": f"S={s} H={h} D={d} {str(dtype)[6:]}", "provider": name,
                         "ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": flops / med / 1e9, "gbps": "",
                         "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / med,
                         "ratio_vs_sdpa": results["sdpa"][0] / med})
    for b, L, p in (GPU_CACHED if gpu else CPU_CACHED)[: 2 if quick else None]:
        args, contiguous = cached_inputs(b, L, p, h, h, d, dtype, device)
        size = torch.finfo(dtype).bits // 8
        nbytes = b * ((p + L) * h * d * 2 + 2 * L * h * d) * size
        floor_ms = nbytes / (ceil["bandwidth_gbs"] * 1e9) * 1e3
        results = {name: timed(fn, device, quick) for name, fn in cached_providers(args, contiguous, device).items()}
        for name, (med, p20, p80) in results.items():
            rows.append({**base, "op": "block_over_cache", "shape": f"B={b} L={L} P={p} H={h} D={d} {str(dtype)[6:]}",
                         "provider": name, "ms": med, "ms_p20": p20, "ms_p80": p80, "tflops": "",
                         "gbps": nbytes / med / 1e6, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / med,
                         "ratio_vs_sdpa": results["sdpa"][0] / med})
    for r in rows:
        r.update(copy_gbs=ceil["bandwidth_gbs"], matmul_tflops=ceil["peak_tflops"])
    return rows


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__, run, OUT / "attention.csv",
                      ["op", "shape", "provider", "ms", "tflops", "gbps", "pct_floor", "ratio_vs_sdpa"], argv)


if __name__ == "__main__":
    sys.exit(main())
