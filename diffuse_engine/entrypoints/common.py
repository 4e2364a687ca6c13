"""What the command line and the server share: the error of bad command-line input and the ``--device`` check."""

from __future__ import annotations

import re


class UsageError(Exception):
    """Bad command-line input; reported with exit status 2."""


def cuda_reason() -> str:
    """Why CUDA is not available, in torch's words."""
    import torch

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the reason is what torch says
        return str(exc).strip().splitlines()[0]
    return "no CUDA device is visible"


def check_device(device: str | None) -> str | None:
    """``--device`` as given (None: the default), or :class:`UsageError` when it is malformed or names CUDA on a
    machine without it."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N; got {device!r}.")
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was given but CUDA is not available ({cuda_reason()}).")
    return device
