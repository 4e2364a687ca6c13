"""The kernels suite: ``profile`` of attention, row_stats, lm_head_stats, commit, noise and moe over their default grids
(from ``--preset`` / ``--model``, on ``--device`` in ``--dtype``), every row written to ``out/kernels.csv``."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from .. import common
from ..profile import op_rows

OPS = ("attention", "row_stats", "lm_head_stats", "commit", "noise", "moe")


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """Profile each op of :data:`OPS` (respecting ``args.quick``, ``device``, ``dtype``, ``preset``, ``model``,
    ``progress``), append the rows to ``out / "kernels.csv"`` (the union of their columns) and return them."""
    rows = []
    for op in OPS:
        mine = copy.copy(args)
        for name, default in (("shape", None), ("variants", None), ("warmup", None), ("reps", None),
                              ("quick", False), ("progress", None)):
            setattr(mine, name, getattr(args, name, default))
        mine.shape, mine.op = None, op
        rows += op_rows(op, mine)
    common.append_csv(Path(out) / "kernels.csv", rows, union=True)
    return rows
