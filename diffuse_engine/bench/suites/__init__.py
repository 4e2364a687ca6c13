"""``diffuse-engine bench SUITE``: run one benchmark suite, write its CSV(s) into an output folder, print a table,
compare with a previous run's folder (``--compare``) and draw the suite's plots.

Each suite is a module of this package (``kernels``, ``engine``, ``cache``, ``serving``, ``cost_model``,
``quality``, ``gpu``, ``tensor_parallel``), imported by name when asked for, with ``run(args, out) -> list[dict]``:
it writes its CSV(s) into ``out``, every row carrying :func:`..common.stamp`'s columns, and returns the rows. It may
name its CSVs' identifying and time columns (``KEYS``, for ``--compare``) and the columns of the printed table
(``COLUMNS``)."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import re
import sys
from pathlib import Path

from .. import plots
from ..common import print_table
from ..compare import STAMP_COLUMNS, compare_folders
from .options import PartialFailure, resolve_device

MODULES = {"kernels": "kernels", "engine": "engine", "cache": "cache", "serving": "serving",
           "cost-model": "cost_model", "quality": "quality", "gpu": "gpu", "tensor-parallel": "tensor_parallel"}
TABLE_WIDTH = 12  # columns of the printed table when the suite names none


def device_slug(device) -> str:
    """``cpu``, or the card's name in lower case with dashes (``NVIDIA H200`` -> ``nvidia-h200``)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def default_out(device, today: dt.date | None = None) -> Path:
    """``./bench-<YYYY-MM-DD>-<device slug>`` under the current folder."""
    today = today or dt.date.today()
    return Path.cwd() / f"bench-{today.isoformat()}-{device_slug(device)}"


def suite_module(suite: str):
    """The module of ``suite`` (imported on demand)."""
    if suite not in MODULES:
        raise ValueError(f"unknown suite {suite!r}; available: {', '.join(MODULES)}.")
    return importlib.import_module(f"{__name__}.{MODULES[suite]}")


def run(args: argparse.Namespace) -> int:
    """Run ``args.suite`` (the ``bench`` command's flags) into ``--out`` or :func:`default_out`; returns the exit
    status: 0, 1 when some configurations failed, 2 for bad input (a one-line error on stderr)."""
    try:
        if args.compare and not Path(args.compare).is_dir():
            raise ValueError(f"--compare {args.compare}: no such folder.")
        module = suite_module(args.suite)
        if getattr(args, "tensor_parallel_size", None) is not None and args.suite != "tensor-parallel":
            raise ValueError(f"--tensor-parallel-size applies to the tensor-parallel suite, not {args.suite!r} "
                             f"(which runs one rank).")
        out = Path(args.out) if args.out else default_out(resolve_device(args.device))
        out.mkdir(parents=True, exist_ok=True)
        status = 0
        try:
            rows = module.run(args, out)
        except PartialFailure as exc:
            print(f"diffuse-engine bench {args.suite}: {exc}", file=sys.stderr)
            rows, status = exc.rows, 1
        if rows:
            _table(module, rows)
        print(f"# {args.suite}: {len(rows)} rows in {out}")
        if args.compare:
            _compare(module, out, Path(args.compare))
        if rows and (args.plots or (args.plots is None and plots.available())):
            for path in plots.draw(args.suite, rows, out):
                print(f"# wrote {path}")
        return status
    except ValueError as exc:
        print(f"diffuse-engine bench: error: {exc}", file=sys.stderr)
        return 2


def _table(module, rows: list[dict]) -> None:
    columns = getattr(module, "COLUMNS", None)
    if not columns:
        columns = [c for c in rows[0] if c not in STAMP_COLUMNS][:TABLE_WIDTH]
    print_table(rows, [c for c in columns if any(c in r for r in rows)])


def _compare(module, out: Path, old: Path) -> None:
    keys = getattr(module, "KEYS", {})
    matched, only = compare_folders(out, old, keys, list(keys) or None)
    print(f"\n# compared with {old}: new / old of each row's time")
    if matched:
        print_table(matched, ["file", "row", "time", "old", "new", "new/old"])
    for line in only:
        print(f"# {line}")
