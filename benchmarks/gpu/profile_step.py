"""Where one engine step's time goes: a ``torch.profiler`` breakdown per category (GEMM, attention, head, commit,
norms/elementwise, idle). The work is done by :mod:`diffuse_engine.bench.step_profile` (flags: ``--help``);
``diffuse-engine profile step`` does the same per variant, with correctness and timing.

    python benchmarks/gpu/profile_step.py --out profile.csv                       # CUDA: LLaDA-8B shape, bf16
    python benchmarks/gpu/profile_step.py --device cpu --out /tmp/profile.csv     # CPU: llada-tiny, fp32
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from diffuse_engine.bench.step_profile import *  # noqa: E402,F403
from diffuse_engine.bench.step_profile import main  # noqa: E402

if __name__ == "__main__":
    main()
