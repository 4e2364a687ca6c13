"""``profile attention``: full bidirectional and block-causal attention over packed sequences (K4), and a diffusion
block's queries over a paged KV cache (K3).

Shapes: ``B=1,S=1024,H=32,KV=32,D=128`` (B sequences of S tokens, bidirectional), ``...,block=32`` (block-causal),
``B=16,L=32,P=1024,H=32,KV=32,D=128`` (P > 0: B requests, a block of L queries over P cached tokens plus the
block's own keys, paged cache of 64-token pages, RoPE applied to q and the fresh keys). The full forms are
compute-bound (floor: 4 S^2 H D FLOPs per sequence, halved-ish for block-causal is not counted: the floor stays the
dense one); the cached form is memory-bound (floor: the K/V of P + L tokens per request, q and out / bandwidth).
Variants: the torch reference in the profiled dtype, SDPA under each backend torch offers (math, efficient, flash,
cudnn; "sdpa" = torch's own choice), flash-attn when installed (bidirectional only), the Triton kernels; for the
cached form the engine's SDPA path (a gather per request) and SDPA over a contiguous, pre-rotated cache prepared
beforehand (its best case: the gather and rotation are not timed).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ..kernels import reference as ref
from .variants import OpSpec, Unavailable, Variant, define, interpreter_note, max_abs, needs_cuda, triton_reason

PAGE = 64
SDPA_BACKENDS = ("math", "efficient", "flash", "cudnn")


def _grid(config, device: torch.device, quick: bool) -> list[dict]:
    heads = {"H": config.num_heads, "KV": config.num_kv_heads, "D": config.head_dim}
    if device.type == "cuda":
        full = [{"B": 1, "S": 1024}, {"B": 1, "S": 4096}, {"B": 1, "S": 1024, "block": 32}]
        cached = [{"B": b, "L": 32, "P": p} for b in (1, 16, 64) for p in (1024, 4096)]
    else:
        full = [{"B": 1, "S": 64}, {"B": 2, "S": 96, "block": 16}]
        cached = [{"B": 2, "L": 8, "P": 64}, {"B": 4, "L": 16, "P": 128}]
    if quick:
        full, cached = full[::2], cached[:1]
    return [{**s, **heads} for s in full + cached]


def _check(shape: dict) -> None:
    if shape["H"] % shape["KV"]:
        raise ValueError(f"H ({shape['H']}) must be a multiple of KV ({shape['KV']}).")
    if shape["P"] == 0 and shape["S"] < 1:
        raise ValueError("attention needs S >= 1 (bidirectional / block-causal) or P >= 1 (a block over a cache).")
    if shape["D"] % 2 or shape["B"] < 1:
        raise ValueError(f"attention needs an even D and B >= 1; got D={shape['D']}, B={shape['B']}.")


def _label(shape: dict) -> str:
    keys = ("B", "L", "P", "H", "KV", "D") if shape["P"] else ("B", "S", "H", "KV", "D", "block")
    return ",".join(f"{k}={shape[k]}" for k in keys if k != "block" or shape["block"])


# ------------------------------------------------------------------------------------------------- inputs
def _case(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(sum(shape[k] * p for k, p in zip(("B", "S", "P", "L"), (7919, 31, 17, 3),
                                                                         strict=True)))
    b, h, kv, d = shape["B"], shape["H"], shape["KV"], shape["D"]

    def rnd(*dims):
        return torch.randn(*dims, generator=gen).to(device, dtype)

    if not shape["P"]:
        n = b * shape["S"]
        cu = torch.arange(0, n + 1, shape["S"], dtype=torch.int32, device=device)
        return {"kind": "full", "q": rnd(n, h, d), "k": rnd(n, kv, d), "v": rnd(n, kv, d), "cu": cu,
                "S": shape["S"], "B": b, "block": shape["block"] or None}
    L, p = shape["L"], shape["P"]
    pages = math.ceil((p + L) / PAGE)
    pos = torch.arange(p, p + L, dtype=torch.float32)
    ang = torch.cat([pos[:, None] / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))] * 2, dim=-1)
    table = torch.randperm(b * pages, generator=gen).view(b, pages).to(device, torch.int32)
    lens = torch.full((b,), p, dtype=torch.int32, device=device)  # the block starts where the prefix ends
    args = (rnd(b, L, h, d), rnd(b, L, kv, d), rnd(b, L, kv, d), rnd(b * pages, PAGE, kv, d),
            rnd(b * pages, PAGE, kv, d), table, lens, lens.clone(),
            ang.cos().expand(b, L, d).contiguous().to(device), ang.sin().expand(b, L, d).contiguous().to(device))
    return {"kind": "cached", "args": args}


def _reference(case: dict, double: bool):
    if case["kind"] == "full":
        q, k, v = (case[x].double() if double else case[x] for x in "qkv")
        return ref.attention_reference(q, k, v, case["cu"], block_size=case["block"])
    args = tuple(t.double() if double and t.is_floating_point() else t for t in case["args"])
    return ref.block_attention_cached_reference(*args)[0]


# ----------------------------------------------------------------------------------------------- variants
def _sdpa(backend: str | None):
    def build(case: dict):
        if case["kind"] != "full":
            raise Unavailable("this SDPA variant profiles the full forms (see sdpa-gather / sdpa-contiguous)")
        q, k, v, b, s = case["q"], case["k"], case["v"], case["B"], case["S"]
        qh, kh, vh = (t.view(b, s, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        mask = None
        if case["block"]:
            blk = torch.arange(s, device=q.device) // case["block"]
            mask = (blk[:, None] >= blk[None, :])[None, None]
        gqa = q.shape[1] != k.shape[1]

        def call():
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
            return out.transpose(1, 2).reshape(q.shape)
        if backend is None:
            return call
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
                                      "cudnn": "CUDNN_ATTENTION"}[backend])

        def forced():
            try:
                with sdpa_kernel(chosen):
                    return call()
            except RuntimeError as exc:
                if "No available kernel" in str(exc) or "not supported" in str(exc).lower():
                    raise Unavailable(f"torch offers no SDPA {backend} kernel for these inputs") from exc
                raise
        return forced
    return build


def _sdpa_reason(backend: str):
    def available(device: torch.device, dtype: torch.dtype, shape: dict) -> str | None:
        if shape["P"]:
            return "profiles the full forms only (cached form: sdpa-gather, sdpa-contiguous)"
        if backend in ("efficient", "cudnn") and device.type != "cuda":
            return "needs CUDA"
        return None
    return available


def _flash_attn(case: dict):
    from flash_attn import flash_attn_varlen_func

    return lambda: flash_attn_varlen_func(case["q"], case["k"], case["v"], case["cu"], case["cu"], case["S"],
                                          case["S"])


def _flash_attn_reason(device: torch.device, dtype: torch.dtype, shape: dict) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed"
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "flash-attn needs fp16/bf16 CUDA tensors"
    return "flash-attn has no block-causal mask or paged block form" if shape["block"] or shape["P"] else None


def _triton(num_splits: int | None = None):
    def build(case: dict):
        if case["kind"] == "full":
            from ..kernels.attention import attention

            return lambda: attention(case["q"], case["k"], case["v"], case["cu"], case["S"], block_size=case["block"])
        from ..kernels.attention_cached import block_attention_cached

        return lambda: block_attention_cached(*case["args"], num_splits=num_splits)
    return build


def _cached_only(device: torch.device, dtype: torch.dtype, shape: dict) -> str | None:
    return None if shape["P"] else "the cached form only (P > 0)"


def _sdpa_gather(case: dict):
    if case["kind"] != "cached":
        raise Unavailable("the cached form only (P > 0)")
    from ..ops import block_attention_cached

    return lambda: block_attention_cached(*case["args"], backend="sdpa")


def _sdpa_contiguous(case: dict):
    """SDPA over keys already gathered into a contiguous [B, KV, P + L, D] cache and rotated (not timed)."""
    if case["kind"] != "cached":
        raise Unavailable("the cached form only (P > 0)")
    q, k_new, v_new, k_cache, v_cache, table, lens, _, cos, sin = case["args"]
    b, L, h, d = q.shape
    page = k_cache.shape[1]
    cs, sn = cos.float()[:, :, None, :], sin.float()[:, :, None, :]

    def rope(x):
        xf = x.float()
        return (xf * cs + torch.cat((-xf[..., d // 2:], xf[..., :d // 2]), dim=-1) * sn).to(x.dtype)

    p = int(lens[0])
    pos = torch.arange(p, device=q.device)
    slots = table.long()[:, pos // page], pos % page
    keys = torch.cat((k_cache[slots[0], slots[1]], rope(k_new)), dim=1).transpose(1, 2).contiguous()
    vals = torch.cat((v_cache[slots[0], slots[1]], v_new), dim=1).transpose(1, 2).contiguous()
    qr = rope(q).transpose(1, 2).contiguous()
    gqa = h != keys.shape[1]
    return lambda: F.scaled_dot_product_attention(qr, keys, vals, enable_gqa=gqa).transpose(1, 2)


def _variants() -> dict[str, Variant]:
    out = {"torch": Variant("torch", lambda case: lambda: _reference(case, False)),
           "sdpa": Variant("sdpa", _sdpa(None), _sdpa_reason("auto"))}
    out.update({f"sdpa-{b}": Variant(f"sdpa-{b}", _sdpa(b), _sdpa_reason(b)) for b in SDPA_BACKENDS})
    out["flash-attn"] = Variant("flash-attn", _flash_attn, _flash_attn_reason)
    out["sdpa-gather"] = Variant("sdpa-gather", _sdpa_gather, _cached_only)
    out["sdpa-contiguous"] = Variant("sdpa-contiguous", _sdpa_contiguous, _cached_only)
    out["triton"] = Variant("triton", _triton(), triton_reason, interpreter_note)
    for splits in (1, 4):
        out[f"triton[splits={splits}]"] = Variant(
            f"triton[splits={splits}]", _triton(splits),
            lambda device, dtype, shape: needs_cuda(device, dtype, shape) or _cached_only(device, dtype, shape))
    return out


def _cost(shape: dict, dtype: torch.dtype) -> tuple[float, float]:
    size = torch.finfo(dtype).bits // 8
    b, h, kv, d = shape["B"], shape["H"], shape["KV"], shape["D"]
    if not shape["P"]:
        s = shape["S"]
        return float(b * s * (2 * h + 2 * kv) * d * size), 4.0 * b * s * s * h * d
    L, p = shape["L"], shape["P"]
    return float(b * ((p + L) * kv * d * 2 + 2 * L * h * d) * size), 0.0


define(OpSpec(name="attention", keys={"B": 1, "S": 0, "H": None, "KV": None, "D": None, "block": 0, "P": 0, "L": 32},
              grid=_grid, make=_case, reference=lambda case: _reference(case, True),
              plain=lambda case: _reference(case, False), error=lambda out, r: (max_abs(out, r), 0), cost=_cost,
              floor_atol=1e-5, variants=_variants(), check_shape=_check, label=_label))
