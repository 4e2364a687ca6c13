"""The single dispatch point for every op of the engine.

Backends: ``torch`` (the references of ``kernels/reference.py`` and plain torch, everywhere), ``triton``
(``kernels/``, CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``), ``cuda`` (the native module built from
``csrc/``). ``DIFFUSE_BACKEND=cuda|triton|torch`` forces one backend for every op that has it: an op that
cannot run on the forced backend raises :class:`BackendUnavailableError` with the reason. Without it, the
best available backend is chosen per call; CPU tensors use the torch path.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from .commit_batch import CommitBatch
from .errors import BackendUnavailableError
from .kernels import reference as ref
from .kernels.commit_torch import commit_torch
from .layout import TokenLayout
from .native import native_status

BACKENDS = ("cuda", "triton", "torch")
BACKEND_ENV = "DIFFUSE_BACKEND"

# CPU matmuls are computed over row counts padded to a multiple of this: oneDNN/MKL then give every row the
# same bits whatever the number of rows, which makes a request's tokens independent of its batch.
INVARIANT_ROWS = 16


def requested_backend() -> str | None:
    """The backend forced through ``DIFFUSE_BACKEND``, or None for automatic choice."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend; use one of {', '.join(BACKENDS)} or 'auto'.")
    return value


def backend_report() -> dict[str, tuple[bool, str]]:
    """For each backend: whether it can run here, and why not (or what it runs on)."""
    report: dict[str, tuple[bool, str]] = {"torch": (True, "always available (reference ops, SDPA attention)")}
    cuda_ok = torch.cuda.is_available()
    if importlib.util.find_spec("triton") is None:
        report["triton"] = (False, "triton is not installed")
    elif cuda_ok:
        report["triton"] = (True, "CUDA device present")
    elif os.environ.get("TRITON_INTERPRET") == "1":
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
    if importlib.util.find_spec("flash_attn") is None:
        report["flash-attn"] = (False, "flash_attn is not installed (optional: pip install flash-attn)")
    else:
        report["flash-attn"] = (True, "importable (attention on fp16/bf16 CUDA tensors)")
    return report


def attention_report() -> dict[str, tuple[bool, str]]:
    """For each attention backend: whether it can run on this machine's default device, and why not."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, 1, 1, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    out = {}
    for name in ATTENTION_BACKENDS:
        ok, why = _attention_runs(name, probe, TokenLayout.packed([1]), None)
        out[name] = (ok, why or f"runs on {device}")
    return out


def _no_kernel(op: str, backend: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"{BACKEND_ENV}={backend} was requested, but op '{op}' has no {backend} "
                                   f"implementation; unset {BACKEND_ENV} or choose 'torch'.")


# --------------------------------------------------------------------------------------------------- linear
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` ``[rows, in]``. On the CPU the row count is padded to a multiple of
    :data:`INVARIANT_ROWS` so that every row's result is independent of the other rows (batch invariance)."""
    rows = x.shape[0]
    if x.device.type == "cpu" and rows % INVARIANT_ROWS:
        padded = x.new_zeros((rows + INVARIANT_ROWS - rows % INVARIANT_ROWS, x.shape[1]))
        padded[:rows] = x
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------------------ attention
ATTENTION_BACKENDS = ("triton", "sdpa", "flash-attn", "reference")
ATTENTION_ENV = "DIFFUSE_ATTENTION_BACKEND"


def attention_backend(q: torch.Tensor, layout: TokenLayout, block_size: int | None = None,
                      requested: str | None = None) -> str:
    """The attention backend for these inputs: ``requested``, else ``DIFFUSE_ATTENTION_BACKEND``, else the one
    forced by ``DIFFUSE_BACKEND`` (triton -> triton, torch -> sdpa, cuda -> refused: no CUDA attention kernel),
    else automatic: on CUDA the Triton kernel for packed batches and block-causal masks (one launch instead of
    one SDPA call per sequence) and SDPA otherwise; SDPA on the CPU. An explicit choice that cannot run raises
    :class:`BackendUnavailableError` saying why."""
    choice = requested or os.environ.get(ATTENTION_ENV, "").strip().lower() or None
    if choice == "auto":
        choice = None
    if choice is not None and choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {choice!r} is not one of {', '.join(ATTENTION_BACKENDS)} (or 'auto').")
    if choice is None:
        forced = requested_backend()
        if forced == "cuda":
            raise _no_kernel("attention", "cuda")
        choice = {"triton": "triton", "torch": "sdpa"}.get(forced or "")
    if choice is None:
        if (q.device.type == "cuda" and _triton_runs(q)[0] and _TRITON_ATTENTION_FAILURE is None
                and (layout.cu_seqlens is not None or block_size)):
            return "triton"
        return "sdpa"
    ok, why = _attention_runs(choice, q, layout, block_size)
    if not ok:
        raise BackendUnavailableError(f"attention backend {choice!r} cannot run here: {why}.")
    return choice


# Set when the automatic choice tried the Triton kernel and it failed to compile or launch (e.g. an older
# Triton): automatic choice then stays on SDPA for the process; an explicit choice still raises.
_TRITON_ATTENTION_FAILURE: str | None = None


def _triton_runs(t: torch.Tensor) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if t.device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"tensors are on {t.device.type}: Triton needs CUDA, or TRITON_INTERPRET=1 for its CPU interpreter"


def _attention_runs(choice: str, q: torch.Tensor, layout: TokenLayout, block_size: int | None) -> tuple[bool, str]:
    if choice == "triton":
        return _triton_runs(q)
    if choice == "flash-attn":
        if importlib.util.find_spec("flash_attn") is None:
            return False, "flash_attn is not installed (optional: pip install flash-attn)"
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return False, "flash-attn needs fp16/bf16 CUDA tensors"
        if block_size or layout.key_mask is not None:
            return False, "flash-attn has no block-causal or key-padding mask in its varlen API"
    return True, ""


def _cu_seqlens(layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, int]:
    if layout.cu_seqlens is not None:
        cu = layout.cu_seqlens
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
        return torch.tensor(cu, dtype=torch.int32, device=device), longest
    b, s = layout.batch, layout.seq_len
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device), s


def _block_causal_mask(n: int, block_size: int, device: torch.device) -> torch.Tensor:
    blk = torch.arange(n, device=device) // block_size
    return blk[:, None] >= blk[None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, *,
              block_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention within each sequence of ``layout``: bidirectional, or block-causal with ``block_size`` (a
    query in block j of its sequence sees the keys of blocks <= j, blocks counted from the sequence's start).

    q ``[N, H, D]``, k and v ``[N, KV, D]`` (H a multiple of KV, GQA), N = ``layout.num_tokens``;
    returns ``[N, H, D]``. Softmax scale 1/sqrt(D). ``backend`` (or ``DIFFUSE_ATTENTION_BACKEND``) picks
    one of :data:`ATTENTION_BACKENDS`; see :func:`attention_backend`.
    """
    global _TRITON_ATTENTION_FAILURE
    explicit = backend or os.environ.get(ATTENTION_ENV, "").strip().lower() not in ("", "auto") \
        or requested_backend() is not None
    choice = attention_backend(q, layout, block_size, backend)
    if choice in ("triton", "reference"):
        cu, max_len = _cu_seqlens(layout, q.device)
        key_valid = None if layout.key_mask is None else layout.key_mask.reshape(-1)
        if choice == "reference":
            return ref.attention_reference(q, k, v, cu, block_size=block_size, key_valid=key_valid)
        from .kernels.attention import attention as triton_attention

        if explicit:
            return triton_attention(q, k, v, cu, max_len, block_size=block_size, key_valid=key_valid)
        try:
            return triton_attention(q, k, v, cu, max_len, block_size=block_size, key_valid=key_valid)
        except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where SDPA runs
            _TRITON_ATTENTION_FAILURE = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"Triton attention failed ({_TRITON_ATTENTION_FAILURE}); using SDPA from now on. Set "
                          f"{ATTENTION_ENV}=triton to see the error raised.", RuntimeWarning, stacklevel=2)
            return attention(q, k, v, layout, block_size=block_size, backend="sdpa")
    if choice == "flash-attn":
        from flash_attn import flash_attn_varlen_func

        cu, max_len = _cu_seqlens(layout, q.device)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=False)
    gqa = q.shape[1] != k.shape[1]
    if layout.cu_seqlens is None:
        b, s = layout.batch, layout.seq_len
        qh, kh, vh = (t.view(b, s, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        mask = None if layout.key_mask is None else layout.key_mask[:, None, None, :].to(torch.bool)
        if block_size:
            causal = _block_causal_mask(s, block_size, q.device)[None, None]
            mask = causal if mask is None else mask & causal
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    outs = []
    cu = layout.cu_seqlens
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        qh, kh, vh = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = _block_causal_mask(end - start, block_size, q.device) if block_size else None
        outs.append(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0].contiguous()


def block_attention_cached(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_table: torch.Tensor, cache_lens: torch.Tensor,
                           block_start: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                           write_cache: bool = False, backend: str | None = None) -> torch.Tensor:
    """A diffusion block's queries over a paged KV cache plus the block's fresh keys (non-causal), RoPE applied
    to q and k_new here; with ``write_cache`` the block's post-RoPE K and V are stored in the cache in place.
    Arguments as :func:`kernels.attention_cached.block_attention_cached`. Backends: ``triton`` (one launch,
    automatic on CUDA), ``sdpa`` (a gather and SDPA per request), ``reference``; flash-attn has no form of
    this op (its KV-cache API cannot leave the block's own cached range out)."""
    choice = backend or os.environ.get(ATTENTION_ENV, "").strip().lower() or None
    if choice in (None, "auto"):
        forced = requested_backend()
        if forced == "cuda":
            raise _no_kernel("block_attention_cached", "cuda")
        choice = {"triton": "triton", "torch": "sdpa"}.get(forced or "") or (
            "triton" if q.device.type == "cuda" and _triton_runs(q)[0] else "sdpa")
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {choice!r} is not one of {', '.join(ATTENTION_BACKENDS)} (or 'auto').")
    if choice == "flash-attn":
        raise BackendUnavailableError("attention backend 'flash-attn' cannot run block_attention_cached: its KV-cache "
                                      "API cannot leave the block's own cached positions out.")
    args = (q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin)
    if choice == "triton":
        ok, why = _triton_runs(q)
        if not ok:
            raise BackendUnavailableError(f"attention backend 'triton' cannot run here: {why}.")
        from .kernels.attention_cached import block_attention_cached as kernel

        return kernel(*args, write_cache=write_cache)
    if choice == "reference":
        out, k_after, v_after = ref.block_attention_cached_reference(*args, write_cache=write_cache)
        if write_cache:
            k_cache.copy_(k_after)
            v_cache.copy_(v_after)
        return out
    b, L, h, d = q.shape
    page = k_cache.shape[1]
    cs, sn = cos.float()[:, :, None, :], sin.float()[:, :, None, :]

    def rope(x: torch.Tensor) -> torch.Tensor:  # rotate-half in fp32, rounded back to x's dtype
        xf = x.float()
        return (xf * cs + torch.cat((-xf[..., d // 2:], xf[..., :d // 2]), dim=-1) * sn).to(x.dtype)

    qr, kr = rope(q), rope(k_new).to(k_cache.dtype)
    out = torch.empty_like(q)
    starts, lens = block_start.tolist(), cache_lens.tolist()
    for i in range(b):
        table = block_table[i].long()
        prefix = torch.arange(0, min(starts[i], lens[i]), device=q.device)
        suffix = torch.arange(starts[i] + L, max(lens[i], starts[i] + L), device=q.device)
        pos = torch.cat((prefix, suffix))
        keys = torch.cat((k_cache[table[pos // page], pos % page], kr[i]))
        vals = torch.cat((v_cache[table[pos // page], pos % page], v_new[i].to(v_cache.dtype)))
        o = F.scaled_dot_product_attention(qr[i].transpose(0, 1)[None], keys.transpose(0, 1)[None].to(q.dtype),
                                           vals.transpose(0, 1)[None].to(q.dtype), enable_gqa=h != keys.shape[1])
        out[i] = o[0].transpose(0, 1)
        if write_cache:
            slots = torch.arange(starts[i], starts[i] + L, device=q.device)
            k_cache[table[slots // page], slots % page] = kr[i]
            v_cache[table[slots // page], slots % page] = v_new[i].to(v_cache.dtype)
    return out


# ------------------------------------------------------------------------------------------------- sampling
def sample_and_score(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                     position: torch.Tensor, *, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                     raw_confidence: torch.Tensor | None = None, conf_exclude: torch.Tensor | None = None,
                     scores: tuple[str, ...] = ("margin", "neg_entropy")) -> dict[str, torch.Tensor]:
    """Logits rows -> sampled token, its probability, top-1 probability, and the requested ``scores``
    (top-1 - top-2 margin, negative entropy). Semantics: :func:`kernels.reference.sample_and_score`.

    CUDA logits (fp32/fp16/bf16) without top-k / top-p filters go through the one-pass :func:`row_stats`
    kernel (native CUDA, else Triton), whose negative entropy is the exact sum q log q (Dream's formula adds
    1e-10 inside the log: a difference below V * 1e-10); everything else through the torch reference."""
    backend = requested_backend()
    fused_ok = top_k is None and top_p is None and logits.dtype != torch.float64
    if backend in ("cuda", "triton") and not fused_ok:
        raise BackendUnavailableError(f"{BACKEND_ENV}={backend} was requested, but sample_and_score has no "
                                      f"{backend} kernel for top-k / top-p filters or fp64 logits.")
    global _ROW_STATS_FAILURE
    auto = backend is None and logits.device.type == "cuda" and _ROW_STATS_FAILURE is None
    if fused_ok and (backend in ("cuda", "triton") or auto):
        rows = torch.arange(logits.shape[0], device=logits.device)
        try:
            out = row_stats(logits, rows, temperature, seed, step, position, raw_confidence=raw_confidence,
                            conf_exclude=conf_exclude)
            return {k: out[k] for k in ("token", "prob", "top1", *scores)}
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where the reference runs
            if backend is not None:
                raise
            _ROW_STATS_FAILURE = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"the one-pass sampling kernel failed ({_ROW_STATS_FAILURE}); using the torch path from "
                          f"now on.", RuntimeWarning, stacklevel=2)
    return ref.sample_and_score(logits, temperature, seed, step, position, top_k=top_k, top_p=top_p,
                                raw_confidence=raw_confidence, conf_exclude=conf_exclude, scores=scores)


# Set when the automatic choice tried the one-pass sampling kernel and it failed to compile or launch.
_ROW_STATS_FAILURE: str | None = None


def _stats_backend(t: torch.Tensor, op: str, native_ok: bool) -> str:
    """cuda / triton / torch for a fused sampling op on ``t``: the forced backend (raising when it cannot run),
    else on CUDA the native kernel when built (``native_ok``), else Triton; torch on the CPU."""
    backend = requested_backend()
    if backend == "cuda":
        if not native_ok:
            raise _no_kernel(op, "cuda")
        if native_status()[0] is None:
            raise BackendUnavailableError(f"{BACKEND_ENV}=cuda was requested for {op}, but {native_status()[1]}.")
        return "cuda"
    if backend == "triton":
        ok, why = _triton_runs(t)
        if not ok:
            raise BackendUnavailableError(f"{BACKEND_ENV}=triton was requested for {op}, but {why}.")
        return "triton"
    if backend == "torch" or t.device.type != "cuda":
        return "torch"
    if native_ok and native_status()[0] is not None:
        return "cuda"
    return "triton" if _triton_runs(t)[0] else "torch"


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
    choice = _stats_backend(logits, "row_stats", native_ok=True)
    args = (logits, rows, temperature, seed, step, position)
    if choice == "cuda":
        from . import native

        out = native.row_stats(*args, raw_confidence=raw_confidence, conf_exclude=conf_exclude)
    elif choice == "triton":
        from .kernels.row_stats import row_stats as kernel

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
    choice = _stats_backend(hidden, "lm_head_stats", native_ok=False)
    if choice == "triton":
        from .kernels.lm_head_stats import lm_head_stats as kernel

        out = kernel(hidden, weight, rows, temperature, seed, step, position, raw_confidence=raw_confidence,
                     conf_exclude=conf_exclude)
    else:
        logits = linear(hidden[rows.long()], weight).float()
        out = ref.row_stats_reference(logits, torch.arange(logits.shape[0], device=logits.device), temperature,
                                      seed, step, position, raw_confidence=raw_confidence,
                                      conf_exclude=conf_exclude)
    return _raise_invalid(out, "lm_head_stats") if check else out


def commit(batch: CommitBatch, *, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit / re-mask in place on ``batch.canvas`` for a batch of requests, one launch and no host sync on
    CUDA (see :func:`kernels.reference.commit_reference` for the rules: LLaDA top-k, Fast-dLLM threshold and
    factor, EB-sampler entropy budget, re-masking below a bound). Backends: native CUDA (C++ twin on CPU
    tensors when forced), Triton and the torch path (``max_rows``: a bound on rows per request, avoiding a sync);
    the torch path is :func:`kernels.commit_torch.commit_torch`, the reference vectorised over the batch.

    Returns ``(committed [M] bool, counters [B, 3] int32)`` on the canvas' device."""
    choice = _stats_backend(batch.canvas, "commit", native_ok=True)
    if choice == "cuda":
        from . import native

        return native.commit(batch)
    if choice == "triton":
        from .kernels.commit import commit as kernel

        return kernel(batch, max_rows=max_rows)
    return commit_torch(batch, max_rows=max_rows)


def _counter_noise(op: str, seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int,
                   num_cols: int | None, gumbel: bool) -> torch.Tensor:
    """Counter-based noise through the native module (CUDA kernel, or its C++ twin for CPU tensors when
    ``DIFFUSE_BACKEND=cuda``) where chosen, else the torch reference."""
    backend = requested_backend()
    if backend == "triton":
        raise _no_kernel(op, backend)
    auto_native = backend is None and seed.device.type == "cuda" and native_status()[0] is not None
    if backend != "cuda" and not auto_native:
        return (ref.counter_gumbel if gumbel else ref.counter_uniform)(seed, step, position, stream, num_cols)
    from . import native

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
