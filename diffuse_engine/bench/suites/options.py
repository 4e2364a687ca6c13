"""What the suites share: the device and dtype a run resolves to, the comma-separated list flags of the scripts and
of ``diffuse-engine bench``, and the exception a suite raises when some of its configurations failed."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class PartialFailure(RuntimeError):
    """Some configurations of a suite failed (each reported as it failed); ``rows`` holds what the others
    measured, already written. ``diffuse-engine bench`` exits with status 1."""

    def __init__(self, message: str, rows: list[dict]) -> None:
        super().__init__(message)
        self.rows = rows


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device (``cuda`` when None and a GPU is present, else ``cpu``); a CUDA device on a machine
    without one is a ValueError."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device on this machine.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> str:
    """``name``, or bfloat16 on CUDA and float32 elsewhere; an unknown name is a ValueError."""
    name = name or ("bfloat16" if device.type == "cuda" else "float32")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; available: {', '.join(DTYPES)}.")
    return name


def ints(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}")
    return out


def floats(text: str) -> list[float]:
    """``"60,150"`` -> ``[60.0, 150.0]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None


def names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A parser of comma-separated names, each one of ``choices``."""
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return out
    return parse


def given(args: argparse.Namespace, name: str, default):
    """``args.name`` when the flag exists and was given (not None), else ``default``."""
    value = getattr(args, name, None)
    return default if value is None else value
