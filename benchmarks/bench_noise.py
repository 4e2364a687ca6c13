"""Counter-based noise (uniform and Gumbel): `diffuse-engine profile noise`.

Torch reference and native CUDA kernel / C++ twin; uniforms bit-exact, Gumbel within twice plain torch's error
against fp64; floor = the M x V fp32 values written (diffuse_engine/bench/ops_misc.py).

    python benchmarks/bench_noise.py [--quick] [--device cpu|cuda] [--csv PATH] [--no-csv] [--cpu-only]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffuse_engine.bench.common import OUT  # noqa: E402
from diffuse_engine.bench.scripts import main as script_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return script_main(__doc__, ("noise",), OUT / "noise.csv", argv, noise_flags=True)


if __name__ == "__main__":
    sys.exit(main())
