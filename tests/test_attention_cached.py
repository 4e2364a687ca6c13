"""Cached block attention (kernels/attention_cached.py) against ``block_attention_cached_reference``.

On CPU the kernel runs under the Triton interpreter on small shapes; the full-size bf16 grid runs on a GPU
(marked ``gpu``). Numerics: the kernel's max abs error against the fp64 reference must be at most twice the
error of the same computation done by plain torch in the low dtype, plus ``ATOL_FLOOR``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

from diffuse_engine.kernels.attention_cached import block_attention_cached  # noqa: E402
from diffuse_engine.kernels.reference import block_attention_cached_reference  # noqa: E402
from diffuse_engine.models.layers import rope_cos_sin  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Outputs are convex combinations of N(0, 1) values (|out| < ~4): 1e-6 is a few fp32 ulps there. It only matters
# in fp32, where torch's own error can be smaller than the kernel's by the luck of summation order; fp16 / bf16
# errors are >= 1e-4.
ATOL_FLOOR = 1e-6
EPS32 = torch.finfo(torch.float32).eps
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(dtype, L, G, KV, D, page_size, requests, seed=0, device=DEVICE):
    """Random inputs; ``requests`` lists (block_start, cache_len) per request. Pages are shuffled, owned by one
    request each, and a few spare pages are never mapped."""
    gen = torch.Generator().manual_seed(seed)
    B, H = len(requests), G * KV
    max_pages = max(-(-max(cl, bs + L) // page_size) for bs, cl in requests)
    num_pages = B * max_pages + 3

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    block_start = torch.tensor([bs for bs, _ in requests], dtype=torch.int32)
    positions = (block_start[:, None].long() + torch.arange(L)).reshape(-1)
    cos, sin = rope_cos_sin(positions, D, 10000.0)
    return dict(
        q=randn(B, L, H, D), k_new=randn(B, L, KV, D), v_new=randn(B, L, KV, D),
        k_cache=randn(num_pages, page_size, KV, D), v_cache=randn(num_pages, page_size, KV, D),
        block_table=torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages).int().to(device),
        cache_lens=torch.tensor([cl for _, cl in requests], dtype=torch.int32, device=device),
        block_start=block_start.to(device), cos=cos.view(B, L, D).to(device), sin=sin.view(B, L, D).to(device),
    )


def written_mask(case, L):
    """[num_pages, page_size] True at the slots of positions [block_start, block_start + L) of each request."""
    k_cache = case["k_cache"]
    mask = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    pos = case["block_start"][:, None].long() + torch.arange(L, device=k_cache.device)
    mask[case["block_table"].long().gather(1, pos // k_cache.shape[1]), pos % k_cache.shape[1]] = True
    return mask


def assert_within(out, ref64, ref_low, what):
    err = (out.double() - ref64).abs()
    torch_err = (ref_low.double() - ref64).abs().max().item()
    bound = 2 * torch_err + ATOL_FLOOR
    if not err.max().item() <= bound:  # also catches NaN
        where = tuple(torch.nonzero(~(err <= bound))[0].tolist())
        raise AssertionError(f"{what}: |kernel - fp64| = {err[where].item():.3g} at (b, l, h, d) = {where} "
                             f"(kernel {out[where].item():.6g}, fp64 {ref64[where].item():.6g}); bound {bound:.3g} "
                             f"= 2 x torch {ref_low.dtype} error {torch_err:.3g} + {ATOL_FLOOR:g}")


def check_case(dtype, L, G, KV, D, page_size, requests, num_splits, write_cache, scale=None, device=DEVICE):
    case = make_case(dtype, L, G, KV, D, page_size, requests, device=device)
    what = f"{dtype} L={L} G={G} KV={KV} D={D} page={page_size} requests={requests} splits={num_splits}"
    k_before, v_before = case["k_cache"].clone(), case["v_cache"].clone()
    out = torch.full_like(case["q"], float("nan"))
    got = block_attention_cached(**case, write_cache=write_cache, num_splits=num_splits, scale=scale, out=out)
    assert got is out
    wide = {n: t.double() if t.is_floating_point() and n not in ("cos", "sin") else t for n, t in case.items()}
    wide.update(k_cache=k_before.double(), v_cache=v_before.double())
    ref64, k_after, v_after = block_attention_cached_reference(**wide, write_cache=write_cache, scale=scale)
    ref_low = block_attention_cached_reference(
        **{**case, "k_cache": k_before, "v_cache": v_before}, write_cache=write_cache, scale=scale)[0]
    assert_within(out, ref64, ref_low, what)

    mask = written_mask(case, L) if write_cache else torch.zeros(k_before.shape[:2], dtype=torch.bool, device=device)
    assert torch.equal(case["k_cache"][~mask], k_before[~mask]), f"{what}: k_cache changed outside the block"
    assert torch.equal(case["v_cache"], v_after.to(dtype)), f"{what}: v_cache differs from v_new / the original"
    # Written keys: one fp32 rotation (error ~ eps32 x |inputs|) then one rounding to the cache dtype.
    k_err = (case["k_cache"][mask].double() - k_after[mask]).abs()
    k_tol = torch.finfo(dtype).eps * k_after[mask].abs() + 2 * EPS32 * case["k_new"].abs().max().item()
    assert bool((k_err <= k_tol).all()), f"{what}: written k off by {k_err.max().item():.3g} from the post-RoPE k"
    return out


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # dtype, L, G, KV, D, page_size, [(block_start, cache_len)], num_splits, write_cache
    (f32, 1, 1, 2, 64, 16, [(0, 0)], 1, True),  # no cache at all: the fresh key only
    (f32, 1, 4, 2, 64, 64, [(300, 300), (5, 5)], None, False),  # prefix cache
    (f32, 19, 4, 2, 64, 16, [(0, 60), (64, 90)], 3, True),  # dual cache, no prefix / short suffix
    (f32, 33, 7, 1, 64, 16, [(300, 400), (5, 38)], 3, True),  # G=7: 8-row groups, L tiled (3 tiles)
    (f32, 19, 1, 3, 32, 64, [(64, 70), (10, 5)], 1, False),  # cache_len inside the block / before it
    (f32, 33, 1, 2, 64, 64, [(64, 128)], None, True),
    (f16, 33, 7, 1, 64, 16, [(5, 60), (300, 300)], 1, True),
    (f16, 19, 1, 3, 128, 64, [(64, 150)], 3, False),
    (f16, 1, 4, 2, 64, 64, [(300, 330)], None, True),
    (f16, 19, 4, 2, 64, 16, [(0, 19), (64, 64), (5, 100)], None, True),
    (bf16, 19, 4, 1, 64, 16, [(100, 140)], None, True),
]
# The grid: every L x G (two kv heads) in fp32 and fp16 over one mixed batch (prefixes 0, 5, 64, 300, with and
# without a suffix), cycling page sizes, split counts and cache writes.
CASES += [
    (dtype, L, G, 2, 64, (16, 64)[i % 2], [(0, L + 20), (5, 5), (64, 64 + L + 40), (300, 300)],
     (1, 3, None)[(i + i // 3) % 3], (i // 2) % 2 == 0)
    for i, (dtype, L, G) in enumerate((d, L, G) for d in (f32, f16) for L in (1, 19, 33) for G in (1, 4, 7))
]


@pytest.mark.parametrize("dtype,L,G,KV,D,page_size,requests,num_splits,write_cache", CASES)
def test_matches_reference(dtype, L, G, KV, D, page_size, requests, num_splits, write_cache):
    check_case(dtype, L, G, KV, D, page_size, requests, num_splits, write_cache)


def test_scale_argument():
    check_case(f32, 19, 2, 2, 64, 16, [(40, 80)], 3, False, scale=0.3)


def test_splits_agree():
    """Splitting only regroups the same sums: 1, 3 and 7 splits (most of them empty) agree to fp32 rounding."""
    case = make_case(f32, 19, 4, 2, 64, 16, [(64, 100), (0, 19)])
    outs = [block_attention_cached(**case, num_splits=s) for s in (1, 3, 7)]
    for s, o in zip((3, 7), outs[1:], strict=True):
        err = (o - outs[0]).abs().max().item()
        assert err <= 4 * EPS32 * outs[0].abs().max().item(), f"num_splits={s} differs from 1 split by {err:.3g}"


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(q=c["q"][0]), "q must be"),
    (lambda c: c.update(q=c["q"][:, :, :3]), "multiple of the number of kv heads"),
    (lambda c: c.update(k_new=c["k_new"][:, :4]), "k_new and v_new must both be"),
    (lambda c: c.update(k_cache=c["k_cache"].half()), "share one dtype"),
    (lambda c: c.update(block_table=c["block_table"].long()), "block_table must be int32"),
    (lambda c: c.update(cache_lens=c["cache_lens"][:1]), "cache_lens must have 2 entries \\(B, as q\\), got 1"),
    (lambda c: c.update(block_start=c["block_start"].long()), "block_start must be int32"),
    (lambda c: c.update(cos=c["cos"][:, :, :32]), "cos must have shape \\(2, 5, 64\\) \\[B, L, D\\]"),
    (lambda c: c.update(out=torch.empty(1)), "out must have shape"),
])
def test_validation(mutate, message):
    case = make_case(f32, 5, 2, 2, 64, 16, [(16, 40), (0, 0)])
    case["out"] = None
    mutate(case)
    with pytest.raises(ValueError, match=message):
        block_attention_cached(**case)


def test_head_dim_must_be_even_power_of_two():
    case = make_case(f32, 5, 1, 1, 64, 16, [(16, 40)])
    for d in (33, 48):
        bad = {n: t[..., :d] if n in ("q", "k_new", "v_new", "k_cache", "v_cache", "cos", "sin") else t
               for n, t in case.items()}
        with pytest.raises(ValueError, match="head_dim must be even"):
            block_attention_cached(**bad)


@gpu
@needs_cuda
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("L", [32, 64])
@pytest.mark.parametrize("prefix", [1024, 4096])
@pytest.mark.parametrize("H,KV", [(32, 32), (32, 8)])
def test_gpu_bf16(B, L, prefix, H, KV):
    # Requests differ: shorter prefixes further down the batch, a suffix on every other request.
    requests = [(prefix - 16 * i, prefix - 16 * i + L + (256 if i % 2 else 0)) for i in range(B)]
    check_case(bf16, L, H // KV, KV, 128, 64, requests, None, True, device="cuda")
