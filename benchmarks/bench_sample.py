"""Logits -> sampled token + statistics (row_stats): `diffuse-engine profile row_stats`.

Torch reference, native CUDA kernel / C++ twin and Triton, checked against fp64, then timed; floor = the logits
read once at the measured copy bandwidth (diffuse_engine/bench/ops_sampling.py).

    python benchmarks/bench_sample.py [--quick] [--device cpu|cuda] [--csv PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffuse_engine.bench.common import OUT  # noqa: E402
from diffuse_engine.bench.scripts import main as script_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, ("row_stats",), OUT / "sampling.csv", argv)


if __name__ == "__main__":
    sys.exit(main())
