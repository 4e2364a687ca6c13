"""pytest-benchmark runs of the CPU kernel micro-benchmarks (``benchmarks/test_kernels.py``).

pyproject's ``addopts`` holds ``--benchmark-disable`` (the test run executes benchmarks once, as tests), which
pytest-benchmark refuses next to ``--benchmark-only``. Asking for numbers (``--benchmark-only``,
``--benchmark-autosave``, ``--benchmark-save``, ``--benchmark-compare``, ``--benchmark-json``) therefore turns
benchmarking back on here, before the plugin configures itself (its ``pytest_configure`` runs last):

    python -m pytest benchmarks --benchmark-only [--benchmark-autosave] [--benchmark-compare]

CI's ``python -m pytest -q`` collects ``tests/`` only (``testpaths``) and never loads this folder.
"""

from __future__ import annotations

import os

# CPU numbers without the Triton interpreter (its timings say nothing about the kernels): Triton variants are
# listed as skipped with the reason. Set TRITON_INTERPRET=1 yourself to check them (slow).
os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_configure(config):
    opt = config.option
    wants_numbers = any(getattr(opt, name, None) for name in ("benchmark_only", "benchmark_autosave", "benchmark_save",
                                                              "benchmark_compare", "benchmark_json"))
    if wants_numbers and hasattr(opt, "benchmark_enable"):
        opt.benchmark_enable = True
