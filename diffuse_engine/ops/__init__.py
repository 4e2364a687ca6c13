"""The single dispatch point for every op of the engine.

Backends: ``torch`` (the references of ``kernels/reference.py`` and plain torch, everywhere), ``triton``
(``kernels/``, CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``), ``cuda`` (the native module built from
``csrc/``). ``DIFFUSE_BACKEND=cuda|triton|torch`` forces one backend for every op that has it: an op that
cannot run on the forced backend raises :class:`BackendUnavailableError` with the reason. Without it, the
best available backend is chosen; CPU tensors use the torch path. The environment is read once and each choice is
cached per op and device (:mod:`.backend`); call :func:`reload` after changing the variables in a running process.

One module per op: :mod:`.linear`, :mod:`.attention` (``attention``, ``block_attention_cached``),
:mod:`.sampling` (``sample_and_score``, ``row_stats``, ``lm_head_stats``), :mod:`.moe` (``moe_experts``),
:mod:`.commit`, :mod:`.noise` (``counter_uniform``, ``counter_gumbel``). The functions ``linear``, ``attention``
and ``commit`` share their module's name, so ``ops.commit`` is the function; reach a module as
``importlib.import_module("diffuse_engine.ops.commit")``. Tensor contracts are checked by
:mod:`diffuse_engine.contract` (re-exported here as :class:`Contract`), the commit op's arguments travel as a
:class:`CommitBatch`.
"""

from __future__ import annotations

from ..commit_batch import CommitBatch
from ..contract import Contract
from ..errors import BackendUnavailableError
from .attention import attention, block_attention_cached
from .backend import (
    ATTENTION_BACKENDS,
    ATTENTION_ENV,
    BACKEND_ENV,
    BACKENDS,
    Settings,
    attention_backend,
    attention_report,
    backend_report,
    native_status,
    reload,
    requested_backend,
    settings,
    triton_runs,
)
from .commit import commit
from .linear import INVARIANT_ROWS, linear
from .moe import moe_experts
from .noise import counter_gumbel, counter_uniform
from .sampling import lm_head_stats, row_stats, sample_and_score

__all__ = [
    "ATTENTION_BACKENDS", "ATTENTION_ENV", "BACKENDS", "BACKEND_ENV", "INVARIANT_ROWS", "BackendUnavailableError",
    "CommitBatch", "Contract", "Settings", "attention", "attention_backend", "attention_report", "backend_report",
    "block_attention_cached", "commit", "counter_gumbel", "counter_uniform", "linear", "lm_head_stats",
    "moe_experts", "native_status", "reload", "requested_backend", "row_stats", "sample_and_score", "settings",
    "triton_runs",
]
