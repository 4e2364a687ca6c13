"""Python launchers of the native module ``diffuse_engine._C`` (CUDA kernels and C++ CPU twins of ``csrc/``).

The module takes raw data pointers and sizes and never sees a tensor, so every launcher here checks the tensor
contract (dtype, rank, length, device, contiguity) first and raises ``ValueError`` with a sentence; only then does it
look for the module, raising :class:`~diffuse_engine.errors.BackendUnavailableError` when it is not built. CPU
tensors run the C++ twin (blocking); CUDA tensors launch the kernel on the tensors' device and its current stream.
The checks are :class:`~diffuse_engine.contract.Contract`'s sentences, shared with the Triton launchers.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from .commit_batch import CommitBatch
from .contract import Contract
from .errors import BackendUnavailableError

MASK32 = 0xFFFFFFFF
MAX_COLS = 2**31 - 1  # column numbers are 32-bit words in the hash (and int32 in the reference)


@lru_cache(maxsize=1)
def native_status() -> tuple[object | None, str]:
    """The native module and '' when it imports, else (None, reason)."""
    if importlib.util.find_spec("diffuse_engine._C") is None:
        return None, ("not built: install with nvcc on PATH (and without DIFFUSE_SKIP_CUDA_BUILD=1) to compile "
                      "csrc/")
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"built but failed to import: {exc}"
    return _C, ""


def native_module() -> object:
    """The imported ``diffuse_engine._C``, or :class:`BackendUnavailableError` saying why it is unavailable."""
    module, why = native_status()
    if module is None:
        raise BackendUnavailableError(f"the native module diffuse_engine._C is unavailable: {why}")
    return module


def _launch(module: object, op: str, device: torch.device, args: tuple) -> None:
    """``op``'s C++ twin for CPU tensors (blocking), else its CUDA kernel on the device's current stream."""
    if device.type == "cpu":
        getattr(module, f"{op}_cpu")(*args)
    else:
        with torch.cuda.device(device):
            getattr(module, f"{op}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)


def _check_device_type(op: str, device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op} runs on CPU or CUDA tensors, got device {device}.")


def counter_noise(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int, num_cols: int,
                  gumbel: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Counter-based noise ``[M, num_cols]`` fp32: uniforms in (0, 1) bit-identical to
    :func:`kernels.reference.counter_uniform`, or Gumbel noise ``-log(-log(u))`` when ``gumbel``.

    seed, step, position: ``[M]`` int64 on one device (CPU or CUDA), contiguous; seed holds uint64 bit patterns,
    step and position contribute their low 32 bits. stream: the noise stream (``STREAM_*`` of the reference; its low
    32 bits are used). out: optional ``[M, num_cols]`` fp32 contiguous tensor on the same device, written and
    returned. CUDA launches are asynchronous on the current stream of the tensors' device.
    """
    check = Contract("seed", seed)
    check("seed", seed, torch.int64, ndim=1, dims="[rows]", contiguous=True)
    rows, device = seed.shape[0], seed.device
    for name, t in (("step", step), ("position", position)):
        check(name, t, torch.int64, ndim=1, dims="[rows]", length=(rows, "rows, as seed"), contiguous=True)
    _check_device_type("counter_noise", device)
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise ValueError(f"stream must be an int, got {type(stream).__name__}.")
    if isinstance(num_cols, bool) or not isinstance(num_cols, int) or not 1 <= num_cols <= MAX_COLS:
        raise ValueError(f"num_cols must be an int in [1, 2**31 - 1], got {num_cols!r}.")
    if out is None:
        out = torch.empty((rows, num_cols), dtype=torch.float32, device=device)
    else:
        check("out", out, torch.float32, shape=(rows, num_cols), dims="[rows, num_cols]", contiguous=True)
    module = native_module()
    if rows == 0:
        return out
    args = (out.data_ptr(), seed.data_ptr(), step.data_ptr(), position.data_ptr(), rows, num_cols,
            stream & MASK32, bool(gumbel))
    _launch(module, "counter_noise", device, args)
    return out


# ------------------------------------------------------------------------------------------------- row stats
ROW_STATS_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # dtype codes of csrc/row_stats.cuh
ROW_STATS_MAX_EXCLUDE = 4
ROW_STATS_KEYS = ("token", "prob", "top1", "margin", "neg_entropy", "invalid")


def row_stats(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
              step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor | None = None,
              conf_exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sampled token and confidence statistics of the rows ``logits[rows]`` in one pass over the vocabulary
    (csrc/row_stats*; semantics of :func:`kernels.reference.row_stats_reference`, computed in fp32).

    logits: ``[R, V]`` fp32, fp16 or bf16 on CPU or CUDA, unit stride along V (rows may be strided).
    rows: ``[M]`` int64 indices into the logits rows; every index must lie in ``[0, R)``. That is checked here for
    CPU tensors; for CUDA tensors it is the caller's contract (a check would synchronise the device), and an index
    outside the range gives an invalid row rather than a read out of bounds (no negative indexing, unlike torch).
    temperature: ``[M]`` fp32 (> 0 samples with counter-based Gumbel noise keyed by seed/step/position, stream
    STREAM_SAMPLE; otherwise argmax). seed, step, position: ``[M]`` int64. raw_confidence: optional ``[M]`` bool
    or uint8: those rows score ``softmax(logits)`` with the ``conf_exclude`` columns at -inf instead of
    ``softmax(logits / T)``. conf_exclude: optional ``[M, K]`` (or ``[M]``) int64 with K <= 4, entries < 0 unused;
    it applies only to raw_confidence rows and is ignored without raw_confidence, as in the reference. All tensors
    on the logits' device and contiguous.

    Returns ``token`` (int64), ``prob``, ``top1``, ``margin``, ``neg_entropy`` (fp32) and ``invalid`` (int32),
    each ``[M]`` on the logits' device; a row whose confidence logits hold NaN or +inf, or no finite entry, gets
    invalid = 1, token -1 and NaN scores (no exception). CPU tensors run the C++ twin (blocking); CUDA tensors
    launch one kernel on the current stream of their device (asynchronous).
    """
    check = Contract("logits", logits)
    check("logits", logits, tuple(ROW_STATS_DTYPES), ndim=2, dims="[R, V]", last_dim_contiguous=True)
    num_logit_rows, vocab = logits.shape
    device = logits.device
    _check_device_type("row_stats", device)
    if not 1 <= vocab <= MAX_COLS:
        raise ValueError(f"logits must have V in [1, 2**31 - 1] columns, got {vocab}.")
    row_stride = logits.stride(0) if num_logit_rows > 1 else vocab
    if row_stride < vocab:
        raise ValueError(f"logits rows must not overlap (row stride >= V), got strides {logits.stride()}.")
    m = check("rows", rows, torch.int64, ndim=1, dims="[M]", contiguous=True).shape[0]
    per_row = {"temperature": (temperature, torch.float32), "seed": (seed, torch.int64), "step": (step, torch.int64),
               "position": (position, torch.int64)}
    if raw_confidence is not None:
        per_row["raw_confidence"] = (raw_confidence, (torch.bool, torch.uint8))
    for name, (t, dtype) in per_row.items():
        check(name, t, dtype, ndim=1, dims="[M]", length=(m, "M, as rows"), contiguous=True)
    k = 0
    if conf_exclude is not None:
        check("conf_exclude", conf_exclude, torch.int64, contiguous=True)
        if conf_exclude.ndim not in (1, 2) or conf_exclude.shape[0] != m:
            raise ValueError(f"conf_exclude must be [M, K] or [M] with M = {m}, got shape {tuple(conf_exclude.shape)}.")
        k = conf_exclude.shape[1] if conf_exclude.ndim == 2 else 1
        if k > ROW_STATS_MAX_EXCLUDE:
            raise ValueError(f"conf_exclude may hold at most {ROW_STATS_MAX_EXCLUDE} columns per row, got {k}.")
    if device.type == "cpu" and m and not bool(((rows >= 0) & (rows < num_logit_rows)).all()):
        bad = int(((rows < 0) | (rows >= num_logit_rows)).nonzero()[0, 0])
        raise ValueError(f"rows[{bad}] = {int(rows[bad])} is outside [0, {num_logit_rows}), the logits rows.")
    module = native_module()
    out = {"token": torch.empty(m, dtype=torch.int64, device=device),
           **{key: torch.empty(m, dtype=torch.float32, device=device)
              for key in ("prob", "top1", "margin", "neg_entropy")},
           "invalid": torch.empty(m, dtype=torch.int32, device=device)}
    if m == 0:
        return out
    use_exclude = raw_confidence is not None and conf_exclude is not None and k > 0
    args = (logits.data_ptr(), ROW_STATS_DTYPES[logits.dtype], num_logit_rows, row_stride, vocab, rows.data_ptr(), m,
            temperature.data_ptr(), seed.data_ptr(), step.data_ptr(), position.data_ptr(),
            raw_confidence.data_ptr() if raw_confidence is not None else 0,
            conf_exclude.data_ptr() if use_exclude else 0, k if use_exclude else 0,
            *(out[key].data_ptr() for key in ROW_STATS_KEYS))
    _launch(module, "row_stats", device, args)
    return out


# ---------------------------------------------------------------------------------------------------- commit
COMMIT_MAX_ROWS = 2048  # candidate rows per request (kCommitMaxRows of csrc/commit.cuh)
COMMIT_NUM_MODES = 4  # COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY of kernels/reference.py


def _check_offsets_cpu(name: str, offsets: torch.Tensor, total: int, rows_name: str) -> torch.Tensor:
    """CPU only: non-decreasing offsets in [0, total]; returns the per-request sizes."""
    if offsets.numel() and (int(offsets[0]) < 0 or int(offsets[-1]) > total):
        raise ValueError(f"{name} must lie in [0, {total}] (the {rows_name} entries), got {offsets[0].item()} .. "
                         f"{offsets[-1].item()}.")
    sizes = offsets[1:] - offsets[:-1]
    if bool((sizes < 0).any()):
        raise ValueError(f"{name} must be non-decreasing.")
    return sizes


def commit(batch: CommitBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit (and optionally re-mask) in place on the flat ``batch.canvas`` for a batch of B requests
    (csrc/commit*; semantics of :func:`kernels.reference.commit_reference`, results equal).

    The batch must keep :meth:`CommitBatch.validate`'s strict contract (the dtypes and lengths of its fields, all
    contiguous on the canvas' device), on CPU or CUDA; the canvas is modified in place.

    Values, checked here for CPU tensors and the caller's contract for CUDA tensors (a check would synchronise the
    device; the kernel skips out-of-range writes and clamps offsets instead of reading out of bounds): offsets
    non-decreasing within ``[0, M]`` / ``[0, R]``, canvas indices in ``[0, N)``, modes in 0..3, count >= 0, at
    most ``COMMIT_MAX_ROWS`` rows per request (a larger request commits nothing and gets counters ``(-1, remasked,
    -1)``), scores not NaN, and canvas slots not shared between requests (requests run concurrently on the GPU).

    Returns ``(committed [M] bool, counters [B, 3] int32)`` on the canvas' device. CPU tensors run the C++ twin
    (blocking); CUDA tensors launch one kernel on the current stream of their device (asynchronous).
    """
    batch.validate()
    device = batch.canvas.device
    _check_device_type("commit", device)
    revise = batch.has_revision
    canvas, row_offsets, row_index, mode, count, score = (batch.canvas, batch.row_offsets, batch.row_index,
                                                          batch.mode, batch.count, batch.score)
    revise_offsets, revise_index = batch.revise_offsets, batch.revise_index
    b, m = batch.num_requests, batch.num_rows
    r = revise_index.shape[0] if revise else 0
    if device.type == "cpu":
        sizes = _check_offsets_cpu("row_offsets", row_offsets, m, "row_index")
        if b and int(sizes.max()) > COMMIT_MAX_ROWS:
            raise ValueError(f"a request has {int(sizes.max())} candidate rows; at most {COMMIT_MAX_ROWS} are "
                             f"supported.")
        n_canvas = canvas.shape[0]
        for name, idx in (("row_index", row_index), ("revise_index", revise_index if revise else None)):
            if idx is not None and idx.numel() and not bool(((idx >= 0) & (idx < n_canvas)).all()):
                bad = int(((idx < 0) | (idx >= n_canvas)).nonzero()[0, 0])
                raise ValueError(f"{name}[{bad}] = {int(idx[bad])} is outside [0, {n_canvas}), the canvas.")
        if b and not bool(((mode >= 0) & (mode < COMMIT_NUM_MODES)).all()):
            bad = int(((mode < 0) | (mode >= COMMIT_NUM_MODES)).nonzero()[0, 0])
            raise ValueError(f"unknown commit mode {int(mode[bad])} for request {bad}.")
        if b and bool((count < 0).any()):
            raise ValueError("count must be >= 0.")
        if m and bool(score.isnan().any()):
            raise ValueError("score must not hold NaN (the rank order is undefined).")
        if revise:
            _check_offsets_cpu("revise_offsets", revise_offsets, r, "revise_index")
    module = native_module()
    committed = torch.zeros(m, dtype=torch.uint8, device=device)
    counters = torch.zeros(b, 3, dtype=torch.int32, device=device)
    if b == 0:
        return committed.view(torch.bool), counters
    args = (canvas.data_ptr(), canvas.shape[0], row_offsets.data_ptr(), b, row_index.data_ptr(),
            batch.token.data_ptr(), score.data_ptr(), batch.entropy.data_ptr(), m, mode.data_ptr(), count.data_ptr(),
            batch.threshold.data_ptr(), batch.factor.data_ptr(), batch.eb_gamma.data_ptr(), int(batch.mask_id),
            revise_offsets.data_ptr() if revise else 0, revise_index.data_ptr() if revise else 0,
            batch.revise_score.data_ptr() if revise else 0, batch.remask_bound.data_ptr() if revise else 0, r,
            committed.data_ptr(), counters.data_ptr())
    _launch(module, "commit", device, args)
    return committed.view(torch.bool), counters
