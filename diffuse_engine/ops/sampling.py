"""The sampling ops: ``ops.sample_and_score`` (logits -> token and scores), ``ops.row_stats`` (its one-pass kernel
over selected rows) and ``ops.lm_head_stats`` (the fused LM head: the same statistics without writing logits)."""

from __future__ import annotations

import warnings

import torch

from .. import native
from ..kernels import reference as ref
from .backend import kernel_backend, record_failure, requested_backend, sampling_backend
from .linear import linear


def sample_and_score(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                     position: torch.Tensor, *, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                     raw_confidence: torch.Tensor | None = None, conf_exclude: torch.Tensor | None = None,
                     scores: tuple[str, ...] = ("margin", "neg_entropy")) -> dict[str, torch.Tensor]:
    """Logits rows -> sampled token, its probability, top-1 probability, and the requested ``scores``
    (top-1 - top-2 margin, negative entropy). Semantics: :func:`kernels.reference.sample_and_score`.

    CUDA logits (fp32/fp16/bf16) without top-k / top-p filters go through the one-pass :func:`row_stats`
    kernel (native CUDA, else Triton), whose negative entropy is the exact sum q log q (Dream's formula adds
    1e-10 inside the log: a difference below V * 1e-10); everything else through the torch reference."""
    filtered = top_k is not None or top_p is not None
    if sampling_backend(logits.device.type, logits.dtype, filtered) == "row_stats":
        rows = torch.arange(logits.shape[0], device=logits.device)
        try:
            out = row_stats(logits, rows, temperature, seed, step, position, raw_confidence=raw_confidence,
                            conf_exclude=conf_exclude)
            return {k: out[k] for k in ("token", "prob", "top1", *scores)}
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where the reference runs
            if requested_backend() is not None:
                raise
            why = f"{type(exc).__name__}: {exc}"
            record_failure("sample_and_score", why)
            warnings.warn(f"the one-pass sampling kernel failed ({why}); using the torch path from now on.",
                          RuntimeWarning, stacklevel=2)
    return ref.sample_and_score(logits, temperature, seed, step, position, top_k=top_k, top_p=top_p,
                                raw_confidence=raw_confidence, conf_exclude=conf_exclude, scores=scores)


def _raise_invalid(out: dict[str, torch.Tensor], op: str) -> dict[str, torch.Tensor]:
    bad = out["invalid"].nonzero()
    if bad.numel():
        raise ValueError(f"{op}: row {int(bad[0, 0])} has NaN or +inf logits, or no finite entry.")
    return out


def row_stats(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
              step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor | None = None,
              conf_exclude: torch.Tensor | None = None, check: bool = True) -> dict[str, torch.Tensor]:
    """One pass over the vocabulary for the rows ``logits[rows]``: sampled token, prob, top1, margin, exact
    neg_entropy, invalid (see :func:`kernels.reference.row_stats_reference`). Backends: the native CUDA kernel
    (C++ twin on CPU tensors when forced), Triton, the torch reference. ``check`` raises ValueError for invalid
    rows (one device sync); without it they come back flagged."""
    choice = kernel_backend("row_stats", logits.device.type)
    args = (logits, rows, temperature, seed, step, position)
    if choice == "cuda":
        out = native.row_stats(*args, raw_confidence=raw_confidence, conf_exclude=conf_exclude)
    elif choice == "triton":
        from ..kernels.row_stats import row_stats as kernel

        out = kernel(*args, raw_confidence=raw_confidence, conf_exclude=conf_exclude)
    else:
        out = ref.row_stats_reference(*args, raw_confidence=raw_confidence, conf_exclude=conf_exclude)
    return _raise_invalid(out, "row_stats") if check else out


def lm_head_stats(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, *,
                  raw_confidence: torch.Tensor | None = None, conf_exclude: torch.Tensor | None = None,
                  check: bool = True) -> dict[str, torch.Tensor]:
    """The fused LM head: :func:`row_stats` of ``hidden[rows] @ weight.T`` without writing the logits (Triton
    on CUDA or under the interpreter); the torch path computes the fp32 logits of the rows, then the
    reference statistics."""
    if kernel_backend("lm_head_stats", hidden.device.type) == "triton":
        from ..kernels.lm_head_stats import lm_head_stats as kernel

        out = kernel(hidden, weight, rows, temperature, seed, step, position, raw_confidence=raw_confidence,
                     conf_exclude=conf_exclude)
    else:
        logits = linear(hidden[rows.long()], weight).float()
        out = ref.row_stats_reference(logits, torch.arange(logits.shape[0], device=logits.device), temperature,
                                      seed, step, position, raw_confidence=raw_confidence,
                                      conf_exclude=conf_exclude)
    return _raise_invalid(out, "lm_head_stats") if check else out
