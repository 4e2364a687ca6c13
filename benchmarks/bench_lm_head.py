"""The fused LM head + statistics (lm_head_stats): `diffuse-engine profile lm_head_stats`.

Matmul + torch statistics, matmul + native row_stats, and the fused Triton kernel, checked against fp64, then timed;
floor = max(weight bytes / bandwidth, 2 M V D / matmul rate) (diffuse_engine/bench/ops_sampling.py).

    python benchmarks/bench_lm_head.py [--quick] [--device cpu|cuda] [--csv PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffuse_engine.bench.common import OUT  # noqa: E402
from diffuse_engine.bench.scripts import main as script_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, ("lm_head_stats",), OUT / "sampling.csv", argv)


if __name__ == "__main__":
    sys.exit(main())
