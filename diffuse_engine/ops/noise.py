"""``ops.counter_uniform`` and ``ops.counter_gumbel``: counter-based noise keyed by (seed, step, position, stream,
column), through the native module or the torch reference (bit-identical uniforms)."""

from __future__ import annotations

import torch

from .. import native
from ..kernels import reference as ref
from .backend import kernel_backend


def _counter_noise(op: str, seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int,
                   num_cols: int | None, gumbel: bool) -> torch.Tensor:
    """Counter-based noise through the native module (CUDA kernel, or its C++ twin for CPU tensors when
    ``DIFFUSE_BACKEND=cuda``) where chosen, else the torch reference."""
    if kernel_backend(op, seed.device.type) != "cuda":
        return (ref.counter_gumbel if gumbel else ref.counter_uniform)(seed, step, position, stream, num_cols)
    # The reference broadcasts its per-row inputs and takes any integer dtype; the launcher wants flat int64 rows.
    seed, step, position = torch.broadcast_tensors(seed, step, position)
    shape = seed.shape
    seed, step, position = (t.reshape(-1).to(torch.int64).contiguous() for t in (seed, step, position))
    out = native.counter_noise(seed, step, position, stream, num_cols or 1, gumbel=gumbel)
    return out.view(*shape, num_cols) if num_cols is not None else out.view(shape)


def counter_uniform(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int,
                    num_cols: int | None = None) -> torch.Tensor:
    """Counter-based uniforms in (0, 1); semantics: :func:`kernels.reference.counter_uniform`. CUDA tensors use the
    native kernel when the module is built (bit-identical)."""
    return _counter_noise("counter_uniform", seed, step, position, stream, num_cols, gumbel=False)


def counter_gumbel(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int,
                   num_cols: int | None = None) -> torch.Tensor:
    """Counter-based Gumbel noise ``-log(-log(u))``; semantics: :func:`kernels.reference.counter_gumbel` (the native
    kernel's logf may differ from torch's log by about an ulp)."""
    return _counter_noise("counter_gumbel", seed, step, position, stream, num_cols, gumbel=True)
