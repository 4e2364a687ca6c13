"""Which backend runs each op: resolved once per (op, device type[, dtype and the few call facts that matter]) and
cached, from settings read once from the environment.

Backends: ``torch`` (the references of ``kernels/reference.py`` and plain torch, everywhere), ``triton``
(``kernels/``, CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``), ``cuda`` (the native module built from
``csrc/``); attention has its own names (:data:`ATTENTION_BACKENDS`). An explicit choice (``DIFFUSE_BACKEND``,
``DIFFUSE_ATTENTION_BACKEND``, a ``backend=`` argument) must run or raise :class:`BackendUnavailableError` with
the reason; automatic choice takes the best available, and CPU tensors use the torch path.

The environment (``DIFFUSE_BACKEND``, ``DIFFUSE_ATTENTION_BACKEND``, ``TRITON_INTERPRET``) is read into
:class:`Settings` on first use, not per call. A process that changes these variables afterwards calls
:func:`reload`, which re-reads them and forgets every cached choice (tests use the ``backend_env`` fixture).

When an automatically chosen kernel fails to compile or launch (an older Triton, say), its op calls
:func:`record_failure`; automatic choice then avoids that kernel for the rest of the process (:func:`reload` keeps
the record), while an explicit choice still raises the error.

Also here: :func:`native_status` (defined in :mod:`diffuse_engine.native`, which loads the module) and the reports of
``diffuse-engine info`` (:func:`backend_report`, :func:`attention_report`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import torch

from ..errors import BackendUnavailableError
from ..native import native_status

if TYPE_CHECKING:
    from ..layout import TokenLayout

BACKENDS = ("cuda", "triton", "torch")
BACKEND_ENV = "DIFFUSE_BACKEND"
ATTENTION_BACKENDS = ("triton", "sdpa", "flash-attn", "reference")
ATTENTION_ENV = "DIFFUSE_ATTENTION_BACKEND"
INTERPRET_ENV = "TRITON_INTERPRET"

# The implementations of each kernel op, best first: automatic choice on CUDA takes the first that runs.
KERNEL_OPS = {
    "row_stats": ("cuda", "triton", "torch"),
    "commit": ("cuda", "triton", "torch"),
    "lm_head_stats": ("triton", "torch"),
    "moe_experts": ("triton", "torch"),
    "counter_uniform": ("cuda", "torch"),
    "counter_gumbel": ("cuda", "torch"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The environment as ops sees it: ``backend`` and ``attention`` are ``DIFFUSE_BACKEND`` and
    ``DIFFUSE_ATTENTION_BACKEND`` stripped and lower-cased ('' when unset; validated when used, so that a bad
    value raises at the op that reads it), ``triton_interpret`` whether ``TRITON_INTERPRET=1``."""

    backend: str = ""
    attention: str = ""
    triton_interpret: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(backend=env.get(BACKEND_ENV, "").strip().lower(),
                   attention=env.get(ATTENTION_ENV, "").strip().lower(),
                   triton_interpret=env.get(INTERPRET_ENV) == "1")


_SETTINGS: Settings | None = None
_CHOICES: dict[tuple, str] = {}
_FAILURES: dict[str, str] = {}


def settings() -> Settings:
    """The settings in force (read from the environment on first use)."""
    return _SETTINGS if _SETTINGS is not None else reload()


def reload() -> Settings:
    """Re-read ``DIFFUSE_BACKEND``, ``DIFFUSE_ATTENTION_BACKEND`` and ``TRITON_INTERPRET``, forget every cached
    choice, and return the new settings. Call it after changing those variables in a running process."""
    global _SETTINGS
    _SETTINGS = Settings.from_env()
    _CHOICES.clear()
    _installed.cache_clear()
    return _SETTINGS


def _cached(key: tuple, resolve: Callable[[], str]) -> str:
    """The choice for ``key``, resolved on first use. Errors are not cached: a refused choice raises every time."""
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = resolve()
    return choice


def record_failure(op: str, why: str) -> None:
    """An automatically chosen kernel of ``op`` failed: automatic choice avoids it from now on."""
    _FAILURES[op] = why


def failure(op: str) -> str | None:
    """Why ``op``'s automatically chosen kernel failed in this process, or None."""
    return _FAILURES.get(op)


def requested_backend() -> str | None:
    """The backend forced through ``DIFFUSE_BACKEND``, or None for automatic choice."""
    value = settings().backend
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend; use one of {', '.join(BACKENDS)} or 'auto'.")
    return value


def requested_attention(requested: str | None = None) -> str | None:
    """The attention backend asked for: ``requested``, else ``DIFFUSE_ATTENTION_BACKEND``; None for automatic."""
    choice = requested or settings().attention or None
    if choice == "auto":
        return None
    if choice is not None and choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {choice!r} is not one of {', '.join(ATTENTION_BACKENDS)} (or 'auto').")
    return choice


def no_kernel(op: str, backend: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"{BACKEND_ENV}={backend} was requested, but op '{op}' has no {backend} "
                                   f"implementation; unset {BACKEND_ENV} or choose 'torch'.")


# ------------------------------------------------------------------------------------------------ availability
@cache
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def triton_runs(device: torch.device | str) -> tuple[bool, str]:
    """Whether Triton kernels run on tensors of ``device`` (CUDA, or the CPU interpreter), and why not."""
    device_type = torch.device(device).type
    if not _installed("triton"):
        return False, "triton is not installed"
    if device_type == "cuda" or settings().triton_interpret:
        return True, ""
    return False, f"tensors are on {device_type}: Triton needs CUDA, or TRITON_INTERPRET=1 for its CPU interpreter"


def _attention_runs(choice: str, device_type: str, dtype: torch.dtype, block_causal: bool,
                    key_mask: bool) -> tuple[bool, str]:
    if choice == "triton":
        return triton_runs(device_type)
    if choice == "flash-attn":
        if not _installed("flash_attn"):
            return False, "flash_attn is not installed (optional: pip install flash-attn)"
        if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return False, "flash-attn needs fp16/bf16 CUDA tensors"
        if block_causal or key_mask:
            return False, "flash-attn has no block-causal or key-padding mask in its varlen API"
    return True, ""


# ------------------------------------------------------------------------------------------------- resolution
def kernel_backend(op: str, device_type: str) -> str:
    """cuda / triton / torch for the kernel op ``op`` (a key of :data:`KERNEL_OPS`) on ``device_type`` tensors: the
    forced backend (raising when the op has none or it cannot run), else on CUDA the first of the op's
    implementations that runs; torch on the CPU."""
    return _cached((op, device_type), lambda: _resolve_kernel(op, device_type))


def _resolve_kernel(op: str, device_type: str) -> str:
    impls = KERNEL_OPS[op]
    forced = requested_backend()
    if forced is not None and forced not in impls:
        raise no_kernel(op, forced)
    if forced == "cuda":
        module, why = native_status()
        if module is None:
            raise BackendUnavailableError(f"{BACKEND_ENV}=cuda was requested for {op}, but {why}.")
        return "cuda"
    if forced == "triton":
        ok, why = triton_runs(device_type)
        if not ok:
            raise BackendUnavailableError(f"{BACKEND_ENV}=triton was requested for {op}, but {why}.")
        return "triton"
    if forced == "torch" or device_type != "cuda":
        return "torch"
    if "cuda" in impls and native_status()[0] is not None:
        return "cuda"
    return "triton" if "triton" in impls and triton_runs(device_type)[0] else "torch"


def sampling_backend(device_type: str, dtype: torch.dtype, filtered: bool) -> str:
    """``row_stats`` (the one-pass kernel) or ``torch`` (the reference) for :func:`ops.sample_and_score` on logits
    of ``dtype``, with top-k / top-p filters when ``filtered``: the kernel when forced (raising where it has no
    form) or automatically on CUDA, unless it failed before."""
    key = ("sample_and_score", device_type, dtype, filtered, failure("sample_and_score") is None)
    return _cached(key, lambda: _resolve_sampling(device_type, dtype, filtered))


def _resolve_sampling(device_type: str, dtype: torch.dtype, filtered: bool) -> str:
    forced = requested_backend()
    fused_ok = not filtered and dtype != torch.float64
    if forced in ("cuda", "triton") and not fused_ok:
        raise BackendUnavailableError(f"{BACKEND_ENV}={forced} was requested, but sample_and_score has no "
                                      f"{forced} kernel for top-k / top-p filters or fp64 logits.")
    auto = forced is None and device_type == "cuda" and failure("sample_and_score") is None
    return "row_stats" if fused_ok and (forced in ("cuda", "triton") or auto) else "torch"


def attention_backend(q: torch.Tensor, layout: TokenLayout, block_size: int | None = None,
                      requested: str | None = None) -> str:
    """The attention backend for these inputs: ``requested``, else ``DIFFUSE_ATTENTION_BACKEND``, else the one
    forced by ``DIFFUSE_BACKEND`` (triton -> triton, torch -> sdpa, cuda -> refused: no CUDA attention kernel),
    else automatic: on CUDA the Triton kernel for packed batches and block-causal masks (one launch instead of
    one SDPA call per sequence) and SDPA otherwise; SDPA on the CPU. An explicit choice that cannot run raises
    :class:`BackendUnavailableError` saying why."""
    facts = (q.device.type, q.dtype, layout.cu_seqlens is not None, bool(block_size), layout.key_mask is not None)
    key = ("attention", requested, *facts, failure("attention") is None)
    return _cached(key, lambda: _resolve_attention(requested, *facts))


def _resolve_attention(requested: str | None, device_type: str, dtype: torch.dtype, packed: bool,
                       block_causal: bool, key_mask: bool) -> str:
    choice = requested_attention(requested)
    if choice is None:
        forced = requested_backend()
        if forced == "cuda":
            raise no_kernel("attention", "cuda")
        choice = {"triton": "triton", "torch": "sdpa"}.get(forced or "")
    if choice is None:
        if (device_type == "cuda" and triton_runs(device_type)[0] and failure("attention") is None
                and (packed or block_causal)):
            return "triton"
        return "sdpa"
    ok, why = _attention_runs(choice, device_type, dtype, block_causal, key_mask)
    if not ok:
        raise BackendUnavailableError(f"attention backend {choice!r} cannot run here: {why}.")
    return choice


def cached_attention_backend(device_type: str, requested: str | None = None) -> str:
    """The backend of :func:`ops.block_attention_cached`: as :func:`attention_backend`, automatic choice taking
    Triton on CUDA; flash-attn has no form of this op."""
    return _cached(("block_attention_cached", requested, device_type),
                   lambda: _resolve_cached_attention(device_type, requested))


def _resolve_cached_attention(device_type: str, requested: str | None) -> str:
    choice = requested_attention(requested)
    if choice is None:
        forced = requested_backend()
        if forced == "cuda":
            raise no_kernel("block_attention_cached", "cuda")
        choice = {"triton": "triton", "torch": "sdpa"}.get(forced or "") or (
            "triton" if device_type == "cuda" and triton_runs(device_type)[0] else "sdpa")
    if choice == "flash-attn":
        raise BackendUnavailableError("attention backend 'flash-attn' cannot run block_attention_cached: its KV-cache "
                                      "API cannot leave the block's own cached positions out.")
    if choice == "triton":
        ok, why = triton_runs(device_type)
        if not ok:
            raise BackendUnavailableError(f"attention backend 'triton' cannot run here: {why}.")
    return choice


# ---------------------------------------------------------------------------------------------------- reports
def backend_report() -> dict[str, tuple[bool, str]]:
    """For each backend: whether it can run here, and why not (or what it runs on)."""
    report: dict[str, tuple[bool, str]] = {"torch": (True, "always available (reference ops, SDPA attention)")}
    cuda_ok = torch.cuda.is_available()
    if not _installed("triton"):
        report["triton"] = (False, "triton is not installed")
    elif cuda_ok:
        report["triton"] = (True, "CUDA device present")
    elif settings().triton_interpret:
        report["triton"] = (True, "CPU interpreter (TRITON_INTERPRET=1): for tests, slow")
    else:
        report["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU interpreter)")
    native, why = native_status()
    if native is None:
        report["cuda"] = (False, why)
    elif not cuda_ok:
        report["cuda"] = (False, "native module built, but no CUDA device is visible")
    else:
        report["cuda"] = (True, "native module built and a CUDA device is visible")
    if not _installed("flash_attn"):
        report["flash-attn"] = (False, "flash_attn is not installed (optional: pip install flash-attn)")
    else:
        report["flash-attn"] = (True, "importable (attention on fp16/bf16 CUDA tensors)")
    return report


def attention_report() -> dict[str, tuple[bool, str]]:
    """For each attention backend: whether it can run on this machine's default device, and why not."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = {}
    for name in ATTENTION_BACKENDS:
        ok, why = _attention_runs(name, device, dtype, False, False)
        out[name] = (ok, why or f"runs on {device}")
    return out
