"""Benchmarking and profiling as library code, behind ``diffuse-engine bench`` and ``diffuse-engine profile``.

- :mod:`.common`: the environment stamp every row carries, CSV writing, the device's measured ceilings, and the
  FLOP / byte floors of a denoising step (shared/DESIGN.md §5).
- :mod:`.profile`: every variant of an op (torch reference, Triton, CUDA, C++ twin, SDPA backends, flash-attn),
  checked against fp64 before it is timed; the variants are registered in :mod:`.variants` by :mod:`.ops_attention`,
  :mod:`.ops_sampling`, :mod:`.ops_misc` and :mod:`.ops_step` (one engine step); :mod:`.profile_setup` resolves
  shapes, device, dtype and ceilings.
- :mod:`.step_profile` and :mod:`.step_trace`: where an engine step's time goes (a torch.profiler breakdown per
  category; ``benchmarks/gpu/profile_step.py``).
- :mod:`.scripts`: the command line of the kernel benchmark scripts under ``benchmarks/``.
- :mod:`.suites`: the benchmark suites (kernels, engine, cache, serving, cost-model, quality, gpu).

The scripts under ``benchmarks/`` are thin entry points into these modules.
"""
