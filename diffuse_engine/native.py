"""Python launchers of the native module ``diffuse_engine._C`` (CUDA kernels and C++ CPU twins of ``csrc/``).

The module takes raw data pointers and sizes and never sees a tensor, so every launcher here checks the tensor
contract (dtype, rank, length, device, contiguity) first and raises ``ValueError`` with a sentence; only then does it
look for the module, raising :class:`~diffuse_engine.ops.BackendUnavailableError` when it is not built. CPU tensors
run the C++ twin (blocking); CUDA tensors launch the kernel on the tensors' device and its current stream.
"""

from __future__ import annotations

import torch

from .ops import BackendUnavailableError, native_status

MASK32 = 0xFFFFFFFF
MAX_COLS = 2**31 - 1  # column numbers are 32-bit words in the hash (and int32 in the reference)


def native_module() -> object:
    """The imported ``diffuse_engine._C``, or :class:`BackendUnavailableError` saying why it is unavailable."""
    module, why = native_status()
    if module is None:
        raise BackendUnavailableError(f"the native module diffuse_engine._C is unavailable: {why}")
    return module


def _check_rows(name: str, t: object, rows: int | None, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {t.dtype}.")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [rows], got shape {tuple(t.shape)}.")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows but seed has {rows}; seed, step and position must have the "
                         f"same length.")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but seed is on {device}; all tensors must be on one device.")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous.")


def counter_noise(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int, num_cols: int,
                  gumbel: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Counter-based noise ``[M, num_cols]`` fp32: uniforms in (0, 1) bit-identical to
    :func:`kernels.reference.counter_uniform`, or Gumbel noise ``-log(-log(u))`` when ``gumbel``.

    seed, step, position: ``[M]`` int64 on one device (CPU or CUDA), contiguous; seed holds uint64 bit patterns,
    step and position contribute their low 32 bits. stream: the noise stream (``STREAM_*`` of the reference; its low
    32 bits are used). out: optional ``[M, num_cols]`` fp32 contiguous tensor on the same device, written and
    returned. CUDA launches are asynchronous on the current stream of the tensors' device.
    """
    _check_rows("seed", seed, None, None)
    rows, device = seed.shape[0], seed.device
    _check_rows("step", step, rows, device)
    _check_rows("position", position, rows, device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"counter_noise runs on CPU or CUDA tensors, got device {device}.")
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise ValueError(f"stream must be an int, got {type(stream).__name__}.")
    if isinstance(num_cols, bool) or not isinstance(num_cols, int) or not 1 <= num_cols <= MAX_COLS:
        raise ValueError(f"num_cols must be an int in [1, 2**31 - 1], got {num_cols!r}.")
    if out is None:
        out = torch.empty((rows, num_cols), dtype=torch.float32, device=device)
    else:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}.")
        if out.dtype != torch.float32:
            raise ValueError(f"out must be float32, got {out.dtype}.")
        if tuple(out.shape) != (rows, num_cols):
            raise ValueError(f"out must have shape {(rows, num_cols)} [rows, num_cols], got {tuple(out.shape)}.")
        if out.device != device:
            raise ValueError(f"out is on {out.device} but seed is on {device}; all tensors must be on one device.")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous.")
    module = native_module()
    if rows == 0:
        return out
    args = (out.data_ptr(), seed.data_ptr(), step.data_ptr(), position.data_ptr(), rows, num_cols,
            stream & MASK32, bool(gumbel))
    if device.type == "cpu":
        module.counter_noise_cpu(*args)
    else:
        with torch.cuda.device(device):
            module.counter_noise_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    return out
