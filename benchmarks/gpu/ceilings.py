"""Measure the card's two ceilings and write them as JSON: a thin entry into
:mod:`diffuse_engine.bench.ceilings` (``python -m diffuse_engine.bench.ceilings --out FILE``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # this checkout's package

from diffuse_engine.bench.ceilings import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
