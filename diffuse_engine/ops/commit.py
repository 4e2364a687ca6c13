"""``ops.commit``: commit / re-mask in place on the flat canvas of a batch (:class:`CommitBatch`), dispatched to the
native kernel, the Triton kernel or the vectorised torch path."""

from __future__ import annotations

import torch

from .. import native
from ..commit_batch import CommitBatch
from ..kernels.commit_torch import commit_torch
from .backend import kernel_backend, requested_backend


def commit(batch: CommitBatch, *, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit / re-mask in place on ``batch.canvas`` for a batch of requests, one launch and no host sync on
    CUDA (see :func:`kernels.reference.commit_reference` for the rules: LLaDA top-k, Fast-dLLM threshold and
    factor, EB-sampler entropy budget, re-masking below a bound). Backends: native CUDA (C++ twin on CPU
    tensors when forced), Triton and the torch path (``max_rows``: a bound on rows per request, avoiding a sync);
    the torch path is :func:`kernels.commit_torch.commit_torch`, the reference vectorised over the batch.

    Automatic choice keeps the kernels to what they take (fp32 scores, at most ``native.COMMIT_MAX_ROWS`` rows per
    request by ``max_rows``) and takes the torch path otherwise (fp64 models, very wide windows); a forced backend
    is used as asked.

    Returns ``(committed [M] bool, counters [B, 3] int32)`` on the canvas' device."""
    choice = kernel_backend("commit", batch.canvas.device.type)
    if choice != "torch" and requested_backend() is None and (
            batch.score.dtype != torch.float32 or (max_rows is not None and max_rows > native.COMMIT_MAX_ROWS)):
        choice = "torch"
    if choice == "cuda":
        return native.commit(batch)
    if choice == "triton":
        from ..kernels.commit import commit as kernel

        return kernel(batch, max_rows=max_rows)
    return commit_torch(batch, max_rows=max_rows)
