"""``ops.attention`` (within each sequence of a token layout) and ``ops.block_attention_cached`` (a diffusion
block over a paged KV cache), dispatched to Triton, SDPA, flash-attn or the fp64-capable reference."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..kernels import reference as ref
from ..layout import TokenLayout
from .backend import (
    ATTENTION_ENV,
    attention_backend,
    cached_attention_backend,
    failure,
    record_failure,
    requested_backend,
    settings,
)


def _cu_seqlens(layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, int]:
    if layout.cu_seqlens is not None:
        cu = layout.cu_seqlens
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
        if layout.cu_seqlens_device is not None and layout.cu_seqlens_device.device == device:
            return layout.cu_seqlens_device, longest
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
    explicit = bool(backend) or settings().attention not in ("", "auto") or requested_backend() is not None
    choice = attention_backend(q, layout, block_size, backend)
    if choice in ("triton", "reference"):
        cu, max_len = _cu_seqlens(layout, q.device)
        key_valid = None if layout.key_mask is None else layout.key_mask.reshape(-1)
        if choice == "reference":
            return ref.attention_reference(q, k, v, cu, block_size=block_size, key_valid=key_valid)
        from ..kernels.attention import attention as triton_attention

        if explicit:
            return triton_attention(q, k, v, cu, max_len, block_size=block_size, key_valid=key_valid)
        try:
            return triton_attention(q, k, v, cu, max_len, block_size=block_size, key_valid=key_valid)
        except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where SDPA runs
            record_failure("attention", f"{type(exc).__name__}: {exc}")
            warnings.warn(f"Triton attention failed ({failure('attention')}); using SDPA from now on. Set "
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
                           block_start: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, *,
                           write_cache: bool = False, backend: str | None = None) -> torch.Tensor:
    """A diffusion block's queries over a paged KV cache plus the block's fresh keys (non-causal), RoPE applied
    to q and k_new here (cos / sin None: they are rotated already); with ``write_cache`` the block's post-RoPE K
    and V are stored in the cache in place.
    Arguments as :func:`kernels.attention_cached.block_attention_cached`. Backends: ``triton`` (one launch,
    automatic on CUDA), ``sdpa`` (a gather and SDPA per request), ``reference``; flash-attn has no form of
    this op (its KV-cache API cannot leave the block's own cached range out)."""
    choice = cached_attention_backend(q.device.type, backend)
    args = (q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin)
    if choice == "triton":
        from ..kernels.attention_cached import block_attention_cached as kernel

        return kernel(*args, write_cache=write_cache)
    if choice == "reference":
        out, k_after, v_after = ref.block_attention_cached_reference(*args, write_cache=write_cache)
        if write_cache:
            k_cache.copy_(k_after)
            v_cache.copy_(v_after)
        return out
    b, L, h, d = q.shape
    page = k_cache.shape[1]
    cs = sn = None
    if cos is not None:
        cs, sn = cos.float()[:, :, None, :], sin.float()[:, :, None, :]

    def rope(x: torch.Tensor) -> torch.Tensor:  # rotate-half in fp32, rounded back to x's dtype
        if cs is None:
            return x
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
