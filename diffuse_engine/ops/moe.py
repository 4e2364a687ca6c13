"""``ops.moe_experts``: the routed experts of a mixture-of-experts feed-forward (gate / up / down per expert, SwiGLU,
weighted sum over each token's k experts). Semantics: :func:`kernels.reference.moe_experts_reference`.

Backends: ``triton`` (:mod:`kernels.moe`, two grouped GEMMs with SwiGLU fused into the first; CUDA, or the CPU under
``TRITON_INTERPRET=1``) and ``torch`` (:func:`kernels.moe_torch.moe_experts_grouped`: pairs sorted by expert, one
gate / up / down per expert with tokens, through :func:`ops.linear` so that on the CPU every row's bits are
independent of the batch; ``torch._grouped_mm`` on CUDA bf16 where it applies). No capacity factor, nothing
dropped: a token's output never depends on which other tokens are in the batch.
"""

from __future__ import annotations

import warnings

import torch

from ..contract import KERNEL_FLOATS, dtype_name
from ..errors import BackendUnavailableError
from ..kernels.moe_torch import check_moe_args, moe_experts_grouped
from .backend import failure, kernel_backend, record_failure, requested_backend, triton_runs
from .linear import INVARIANT_ROWS, linear

OP = "moe_experts"
MOE_BACKENDS = ("torch", "triton")


def moe_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, backend: str | None = None,
                check_ids: bool = True) -> torch.Tensor:
    """``out[n] = sum_j topk_weights[n, j] * down_e(silu(gate_e x[n]) * up_e x[n])``, e = ``topk_ids[n, j]``, the
    sum over j in slot order, accumulated in fp32 (fp64 for fp64 inputs); returned in x's dtype.

    x ``[N, d]``; w_gate, w_up ``[E, I, d]``; w_down ``[E, d, I]`` (the experts' stacked Linear weights, all of x's
    dtype); topk_ids ``[N, k]`` int64 or int32 ids in [0, E); topk_weights ``[N, k]`` of any float dtype. N = 0
    gives an empty ``[0, d]``. ``backend``: "torch" or "triton" (must run, else :class:`BackendUnavailableError`);
    None: ``DIFFUSE_BACKEND``, else Triton on CUDA and torch on the CPU, falling back to torch (one warning) when the
    kernel fails. ``check_ids``: check the id range (one device sync on CUDA; turn off inside CUDA graphs).
    Contract violations raise ValueError."""
    n, d, *_ = check_moe_args(x, w_gate, w_up, w_down, topk_ids, topk_weights, check_ids=check_ids)
    if n == 0:
        return x.new_empty((0, d))
    explicit = backend is not None or requested_backend() is not None
    if _choose(backend, x) == "triton":
        from ..kernels.moe import moe_experts as kernel

        try:
            return kernel(x, w_gate, w_up, w_down, topk_ids, topk_weights, check_ids=False)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where the torch path runs
            if explicit:
                raise
            why = f"{type(exc).__name__}: {exc}"
            record_failure(OP, why)
            warnings.warn(f"the Triton MoE kernel failed ({why}); using the torch path from now on.",
                          RuntimeWarning, stacklevel=2)
    pad = INVARIANT_ROWS if x.device.type == "cpu" else 1
    return moe_experts_grouped(x, w_gate, w_up, w_down, topk_ids, topk_weights, linear=linear, pad_rows=pad)


def _choose(backend: str | None, x: torch.Tensor) -> str:
    """torch or triton for these inputs; an explicit choice (argument or DIFFUSE_BACKEND) that cannot run raises."""
    if backend is not None and backend not in MOE_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(MOE_BACKENDS)} or None; got {backend!r}.")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        ok, why = triton_runs(x.device)
        if not ok:
            raise BackendUnavailableError(f"backend 'triton' was requested for {OP}, but {why}.")
        choice = "triton"
    else:
        choice = kernel_backend(OP, x.device.type)
    if choice == "triton" and x.dtype not in KERNEL_FLOATS:
        if backend == "triton" or requested_backend() == "triton":
            raise BackendUnavailableError(f"the Triton kernel of {OP} reads float32, float16 or bfloat16 tensors, "
                                          f"not {dtype_name(x.dtype)}; use the torch backend.")
        return "torch"
    if choice == "triton" and backend is None and requested_backend() is None and failure(OP) is not None:
        return "torch"
    return choice
