"""Attention variants (K4 full / block-causal, K3 a block over a paged cache): `diffuse-engine profile attention`.

Every variant available on the device (torch reference, SDPA backends, flash-attn, Triton) checked against fp64
and timed on the default grid of the device (see diffuse_engine/bench/ops_attention.py for shapes and floors).

    python benchmarks/bench_attention.py [--quick] [--device cpu|cuda] [--csv PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffuse_engine.bench.common import OUT  # noqa: E402
from diffuse_engine.bench.scripts import main as script_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, ("attention",), OUT / "attention.csv", argv)


if __name__ == "__main__":
    sys.exit(main())
