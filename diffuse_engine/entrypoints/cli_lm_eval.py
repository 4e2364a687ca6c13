"""``diffuse-engine lm-eval ARGS...``: lm-evaluation-harness's own command line with the ``diffuse-engine`` model
registered (:mod:`diffuse_engine.integrations.lm_eval`). ARGS pass through unchanged; when they name no
``--include_path``, the shipped tasks' folder is added (``diffuse_addition``, ``diffuse_sudoku4x4``,
``diffuse_text_choice``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

INSTALL = 'pip install "diffuse-engine[eval]"'


def add_lm_eval_command(sub: argparse._SubParsersAction) -> None:
    """List ``lm-eval`` in the help; :func:`run_lm_eval` runs it (its arguments are lm-eval's, not parsed here)."""
    sub.add_parser("lm-eval", help="run lm-evaluation-harness with the diffuse-engine model (arguments: lm-eval's)",
                   add_help=False)


def harness_argv(args: Sequence[str], tasks_dir: str) -> list[str]:
    """lm-eval's argv for ``args``: the shipped tasks' folder added as ``--include_path`` unless one is given."""
    args = list(args)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args) and \
            (not args or args[0] not in ("ls", "validate", "-h", "--help")):
        args += ["--include_path", tasks_dir]
    return ["lm-eval", *args]


def run_lm_eval(args: Sequence[str]) -> int:
    """Run lm-eval's command line on ``args``; returns its exit status."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..integrations.lm_eval import TASKS_DIR
    except ImportError as exc:
        raise ValueError(f"lm-eval is not installed ({exc}): {INSTALL}") from None
    saved = sys.argv
    sys.argv = harness_argv(args, str(TASKS_DIR))
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
