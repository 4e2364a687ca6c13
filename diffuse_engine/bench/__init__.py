"""Benchmarking and profiling as library code, behind ``diffuse-engine bench`` and ``diffuse-engine profile``.

- :mod:`.common`: the environment stamp every row carries, CSV writing, the device's measured ceilings, and the
  FLOP / byte floors of a denoising step (shared/DESIGN.md §5).
- :mod:`.profile`: every variant of an op (torch reference, Triton, CUDA, C++ twin, SDPA backends, flash-attn),
  checked against fp64 before it is timed.
- :mod:`.suites`: the benchmark suites (kernels, engine, cache, serving, cost-model, quality, gpu).

The scripts under ``benchmarks/`` are thin entry points into these modules.
"""
