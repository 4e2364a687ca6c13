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


# ------------------------------------------------------------------------------------------------- row stats
ROW_STATS_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # dtype codes of csrc/row_stats.cuh
ROW_STATS_MAX_EXCLUDE = 4
ROW_STATS_KEYS = ("token", "prob", "top1", "margin", "neg_entropy", "invalid")


def _check_per_row(name: str, t: object, dtypes: tuple[torch.dtype, ...], rows: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {want}, got {t.dtype}.")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [M], got shape {tuple(t.shape)}.")
    if t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} entries but rows has {rows}; every per-row tensor must be [M].")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits is on {device}; all tensors must be on one device.")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous.")


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
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    if logits.dtype not in ROW_STATS_DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}.")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [R, V], got shape {tuple(logits.shape)}.")
    num_logit_rows, vocab = logits.shape
    device = logits.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"row_stats runs on CPU or CUDA tensors, got device {device}.")
    if not 1 <= vocab <= MAX_COLS:
        raise ValueError(f"logits must have V in [1, 2**31 - 1] columns, got {vocab}.")
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits rows must be contiguous (unit stride along V), got strides {logits.stride()}.")
    row_stride = logits.stride(0) if num_logit_rows > 1 else vocab
    if row_stride < vocab:
        raise ValueError(f"logits rows must not overlap (row stride >= V), got strides {logits.stride()}.")
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"rows must be a torch.Tensor, got {type(rows).__name__}.")
    _check_per_row("rows", rows, (torch.int64,), rows.shape[0] if rows.ndim == 1 else -1, device)
    m = rows.shape[0]
    _check_per_row("temperature", temperature, (torch.float32,), m, device)
    for name, t in (("seed", seed), ("step", step), ("position", position)):
        _check_per_row(name, t, (torch.int64,), m, device)
    if raw_confidence is not None:
        _check_per_row("raw_confidence", raw_confidence, (torch.bool, torch.uint8), m, device)
    k = 0
    if conf_exclude is not None:
        if not isinstance(conf_exclude, torch.Tensor):
            raise ValueError(f"conf_exclude must be a torch.Tensor, got {type(conf_exclude).__name__}.")
        if conf_exclude.dtype != torch.int64:
            raise ValueError(f"conf_exclude must be int64, got {conf_exclude.dtype}.")
        if conf_exclude.ndim not in (1, 2) or conf_exclude.shape[0] != m:
            raise ValueError(f"conf_exclude must be [M, K] or [M] with M = {m}, got shape {tuple(conf_exclude.shape)}.")
        k = conf_exclude.shape[1] if conf_exclude.ndim == 2 else 1
        if k > ROW_STATS_MAX_EXCLUDE:
            raise ValueError(f"conf_exclude may hold at most {ROW_STATS_MAX_EXCLUDE} columns per row, got {k}.")
        if conf_exclude.device != device:
            raise ValueError(f"conf_exclude is on {conf_exclude.device} but logits is on {device}; all tensors must "
                             f"be on one device.")
        if not conf_exclude.is_contiguous():
            raise ValueError("conf_exclude must be contiguous.")
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
    if device.type == "cpu":
        module.row_stats_cpu(*args)
    else:
        with torch.cuda.device(device):
            module.row_stats_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    return out
