"""Print the GPU suite's short tables from the files in its output folder and write them as summary.md: a thin
entry into :mod:`diffuse_engine.bench.suites.gpu_summary` (``diffuse-engine bench gpu`` runs it last)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # this checkout's package

from diffuse_engine.bench.suites.gpu_summary import main  # noqa: E402

if __name__ == "__main__":
    main(Path(sys.argv[1]))
