"""What the command line and the server share: the error of bad command-line input, the ``--device`` check and the
tensor-parallel flags."""

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


def add_parallel_args(cmd) -> None:
    """``--tensor-parallel-size``, ``--distributed-init`` and ``--distributed-timeout`` on a subcommand."""
    group = cmd.add_argument_group("tensor parallelism")
    group.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="shard the model over N GPUs, or N CPU processes (default 1)")
    group.add_argument("--distributed-init", choices=("spawn", "env"), default="spawn",
                       help="spawn: the engine starts its ranks; env: torchrun started every rank (default spawn)")
    group.add_argument("--distributed-timeout", type=float, default=120.0, metavar="S",
                       help="seconds rank 0 waits on another rank before failing the requests (default 120)")


def parallel_config(args) -> dict:
    """The EngineConfig fields of the tensor-parallel flags; UsageError for bad values."""
    size = getattr(args, "tensor_parallel_size", 1)
    if size < 1:
        raise UsageError(f"--tensor-parallel-size must be an integer >= 1; got {size}.")
    timeout = getattr(args, "distributed_timeout", 120.0)
    if not timeout > 0 or timeout == float("inf"):
        raise UsageError(f"--distributed-timeout must be a positive number of seconds; got {timeout}.")
    return {"tensor_parallel_size": size, "distributed_init": getattr(args, "distributed_init", "spawn"),
            "distributed_timeout_s": timeout}
