"""Packed varlen attention (kernels/attention.py) against ``attention_reference``.

On CPU the kernel runs under the Triton interpreter on small shapes; the full-size fp16/bf16 grid runs on a GPU
(marked ``gpu``). Numerics: the kernel's max abs error against the fp64 reference must be at most twice the
error of the same attention done by plain torch in the low dtype, plus a per-dtype floor (``FLOOR``).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

from diffuse_engine.kernels.attention import attention  # noqa: E402
from diffuse_engine.kernels.reference import attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# The floor covers outputs where torch's rounding happens to be near exact and the kernel's (exp2 of log2(e)-scaled
# scores, another summation order, fp32 softmax then rounding of p for the fp16/bf16 tensor-core product) is not.
# Outputs are convex combinations of N(0, 1) values (|out| < ~4): the floors are about half an ulp of the output
# dtype there for fp16 / bf16, a few ulps for fp32.
FLOOR = {F32: 1e-6, F16: 1e-3, BF16: 1e-2}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(seqlens, h, kv, d, dtype, seed=0, device=DEVICE):
    """Random q, k, v in ``dtype`` (N(0, 1), never zeros), int32 cu_seqlens, and the fp64 copies of the rounded
    inputs (the references must see the same values as the kernel)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(seqlens)
    q, k, v = (torch.randn(n, heads, d, generator=gen, dtype=torch.float64).to(dtype)
               for heads in (h, kv, kv))
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    return [t.to(device) for t in (q, k, v, cu)]


def check(got, q, k, v, cu, **kw):
    """Compare ``got`` with the fp64 reference under the 2x-torch rule; the message names the worst element."""
    want = attention_reference(q.double(), k.double(), v.double(), cu, **kw)
    torch_err = (attention_reference(q, k, v, cu, **kw).double() - want).abs().max().item()
    bound = 2 * torch_err + FLOOR[q.dtype]
    err = (got.double() - want).abs().nan_to_num(nan=float("inf"))
    worst = err.max().item()
    if worst <= bound:
        return want
    token, head, dim = (int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    seq = int(torch.searchsorted(cu.cpu(), torch.tensor(token, dtype=torch.int32), right=True)) - 1
    raise AssertionError(
        f"{q.dtype} max abs error {worst:.3g} > bound {bound:.3g} (2 x torch error {torch_err:.3g} + floor) at "
        f"sequence {seq}, token {token - int(cu[seq])} (packed row {token}), head {head}, dim {dim}: kernel "
        f"{got[token, head, dim].item():.6g}, reference {want[token, head, dim].item():.6g}")


def run(q, k, v, cu, **kw):
    """The kernel into a NaN-poisoned ``out``: any element it does not write fails the comparison."""
    out = torch.full_like(q, float("nan"))
    max_len = int((cu[1:] - cu[:-1]).max())
    got = attention(q, k, v, cu, max_len, out=out, **kw)
    assert got is out
    return got


VARLEN = [1, 19, 33, 7]
CASES = [  # (seqlens, H, KV, D, dtype, block_size); G = H // KV in {1, 2, 4, 5, 7, 8}
    *[(VARLEN, h, kv, 64, dtype, bs) for dtype in (F32, F16) for h, kv in ((7, 1), (8, 2), (3, 3))
      for bs in (None, 4, 16, 7)],
    ([1], 1, 1, 64, F32, None),
    ([19], 4, 1, 64, F32, 4),
    ([33], 7, 1, 64, F16, 16),
    (VARLEN, 10, 2, 64, F32, 7),
    (VARLEN, 6, 3, 32, F16, None),
    ([5, 0, 3], 4, 2, 64, F16, 4),  # an empty sequence in the batch
    ([150], 3, 3, 64, F32, None),  # several query and key tiles: the unmasked key loop runs
    ([150], 1, 1, 64, F16, 16),  # BLOCK_M 128 spans 8 blocks: per-element block mask
    ([150], 8, 1, 64, F16, 32),  # BLOCK_M 16 divides 32: tiles aligned with blocks
    ([111, 989], 4, 2, 64, F16, None),
    ([111, 989], 8, 8, 32, F32, 32),
    ([33, 150], 4, 4, 128, F32, 16),
    ([19, 33], 8, 2, 128, F16, None),
    (VARLEN, 7, 1, 64, BF16, 7),  # bf16 under the interpreter takes the fp32-cast path
    ([19, 33], 8, 2, 64, BF16, None),
]


def case_id(case):
    seqlens, h, kv, d, dtype, block_size = case
    return f"L{'-'.join(map(str, seqlens))}-H{h}-KV{kv}-D{d}-{str(dtype)[6:]}-bs{block_size}"


@pytest.mark.parametrize("seqlens,h,kv,d,dtype,block_size", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(seqlens, h, kv, d, dtype, block_size):
    q, k, v, cu = make_inputs(seqlens, h, kv, d, dtype)
    check(run(q, k, v, cu, block_size=block_size), q, k, v, cu, block_size=block_size)


def test_custom_scale_and_default_out():
    q, k, v, cu = make_inputs(VARLEN, 8, 2, 64, F32, seed=1)
    got = attention(q, k, v, cu, max(VARLEN), scale=0.3)
    check(got, q, k, v, cu, scale=0.3)


def padded_key_valid(seq_len, device=DEVICE):
    """Three padded rows: left padding (5 keys), right padding (6 keys), and a row with one valid key (10)."""
    valid = torch.ones(3, seq_len, dtype=torch.bool)
    valid[0, :5] = False
    valid[1, -6:] = False
    valid[2] = False
    valid[2, 10] = True
    return valid.reshape(-1).to(device)


@pytest.mark.parametrize("block_size", [None, 4, 7])
@pytest.mark.parametrize("dtype,h,kv", [(F32, 7, 1), (F16, 8, 2)])
def test_key_valid(block_size, dtype, h, kv):
    """Padded keys are ignored; queries whose visible keys are all padding (block 0 of a left-padded row, the
    blocks before key 10 of the third row) output exact zeros."""
    seq_len = 24
    q, k, v, cu = make_inputs([seq_len] * 3, h, kv, 64, dtype, seed=2)
    valid = padded_key_valid(seq_len)
    got = run(q, k, v, cu, block_size=block_size, key_valid=valid)
    want = check(got, q, k, v, cu, block_size=block_size, key_valid=valid)
    empty = (want == 0).all(dim=-1)
    # block 4: positions 0-3 of row 0 and 0-7 of row 2; block 7: positions 0-6 of row 2.
    assert int(empty.any(dim=-1).sum()) == {None: 0, 4: 12, 7: 7}[block_size]
    assert (got[empty] == 0).all(), "queries without a visible valid key must output zeros"
    if block_size is None:  # every query of the third row sees key 10 alone
        torch.testing.assert_close(got[2 * seq_len:], v[2 * seq_len + 10].repeat_interleave(h // kv, 0).expand_as(
            got[2 * seq_len:]), atol=0, rtol=0)


def test_key_valid_int8():
    q, k, v, cu = make_inputs([24] * 3, 8, 2, 64, F32, seed=3)
    valid = padded_key_valid(24).to(torch.int8)
    check(run(q, k, v, cu, block_size=7, key_valid=valid), q, k, v, cu, block_size=7, key_valid=valid)


def test_strided_inputs_and_out_view():
    """q, k, v are head slices of one fused projection and out a view into a wider buffer: only the viewed
    elements are written."""
    seqlens, h, kv, d = [19, 33], 8, 2, 64
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(sum(seqlens), h + 2 * kv, d, generator=gen).to(DEVICE)
    q, k, v = qkv[:, :h], qkv[:, h:h + kv], qkv[:, h + kv:]
    cu = make_inputs(seqlens, 1, 1, 16, F32)[3]
    buf = torch.full((sum(seqlens), h + 1, d), float("nan"), device=DEVICE)
    attention(q, k, v, cu, max(seqlens), block_size=4, out=buf[:, 1:])
    assert buf[:, 0].isnan().all()
    check(buf[:, 1:], q, k, v, cu, block_size=4)


def _bad(**changes):
    q, k, v, cu = make_inputs([3, 5], 4, 2, 16, F32)
    changes = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in changes.items()}
    return {"q": q, "k": k, "v": v, "cu_seqlens": cu, "max_seqlen": 5} | changes


@pytest.mark.parametrize("args,message", [
    (lambda: _bad(q=torch.zeros(8, 4)), "must be \\[tokens, heads, head_dim\\]"),
    (lambda: _bad(k=torch.zeros(8, 3, 16), v=torch.zeros(8, 3, 16)), "multiple of the 3 key/value heads"),
    (lambda: _bad(v=torch.zeros(8, 2, 32)), "k and v must be"),
    (lambda: _bad(k=torch.zeros(8, 2, 16, dtype=F16)), "share one dtype"),
    (lambda: _bad(cu_seqlens=torch.tensor([0, 3, 8])), "int32"),
    (lambda: _bad(block_size=0), "block_size must be at least 1"),
    (lambda: _bad(key_valid=torch.ones(7, dtype=torch.bool)), "key_valid must have 8 entries \\(N, as q\\), got 7"),
    (lambda: _bad(out=torch.zeros(8, 4, 16, dtype=F16)), "out must be"),
    (lambda: _bad(q=torch.zeros(8, 4, 24), k=torch.zeros(8, 2, 24), v=torch.zeros(8, 2, 24)), "power of two"),
])
def test_rejects_bad_inputs(args, message):
    kwargs = args()
    with pytest.raises(ValueError, match=message):
        attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("cu_seqlens"),
                  kwargs.pop("max_seqlen"), **kwargs)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [None, 32])
@pytest.mark.parametrize("h,kv", [(32, 8), (32, 32)])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_full_shapes_on_gpu(dtype, h, kv, block_size):
    q, k, v, cu = make_inputs([1, 511, 1024, 77], h, kv, 128, dtype, seed=5)
    check(run(q, k, v, cu, block_size=block_size), q, k, v, cu, block_size=block_size)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [None, 32, 7])
def test_key_valid_on_gpu(block_size):
    seq_len = 300
    q, k, v, cu = make_inputs([seq_len] * 3, 28, 4, 128, BF16, seed=6)
    valid = padded_key_valid(seq_len)
    check(run(q, k, v, cu, block_size=block_size, key_valid=valid), q, k, v, cu, block_size=block_size,
          key_valid=valid)
