"""Row statistics of existing logits (kernels/row_stats.py) against ``row_stats_reference`` in fp64.

On CPU the kernel runs under the Triton interpreter on small shapes (two real vocabularies with 1-2 rows); the
full grid runs on a GPU (marked ``gpu``).

Tolerances (kernel in fp32 vs the fp64 reference on the same upcast logits): z = x / T is rounded to fp32
(absolute error ~|z| * 6e-8, |z - max| < ~40 here, so ~2.4e-6 relative on e^(z - max)), exp/log cost a few ulps
(more with the GPU's approximate ones), and s sums V terms in a tree (relative error ~log2(V) * 6e-8 < 1.2e-6 for
V = 152064). Hence RTOL = 1e-5 on prob and top1 (4x the sum of those); margin = (e1 - e2) / s carries that
relative error on e1 + e2, so its bound is RTOL * (q1 + q2) <= 2 * RTOL * top1; neg_entropy = w / s - log s
carries it on |w / s| + log s <= |neg_entropy| + 2 log s, plus RTOL absolute.
Tokens: equal at T = 0 (argmax is exact); at T > 0 equal except where the reference's two best perturbed scores
are within TIE_GAP (fp32 z + G against fp64 z + G, or a GPU log an ulp off, can swap those).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from diffuse_engine.kernels import noise_tl  # noqa: E402
from diffuse_engine.kernels.reference import (  # noqa: E402
    STREAM_SAMPLE,
    counter_gumbel,
    counter_uniform,
    row_stats_reference,
)
from diffuse_engine.kernels.row_stats import row_stats  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
RTOL = 1e-5
TIE_GAP = 1e-5
SCORES = ("prob", "top1", "margin", "neg_entropy")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_args(num_logit_rows, v, m, dtype, seed=0, scale=3.0, raw=True, k=3, device=DEVICE):
    """Random logits ``[R, V]`` in ``dtype`` and M selected rows (repeats, any order) with mixed temperatures
    (a third at T = 0), random seeds/steps/positions, and (``raw``) raw-confidence rows with K exclusions."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_logit_rows, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    rows = torch.randint(0, num_logit_rows, (m,), generator=gen)
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.7, 0.0, 1.0])[torch.arange(m) % 6]
    ints = torch.randint(-(2 ** 62), 2 ** 62, (m,), generator=gen)
    kw = {}
    if raw:
        kw["raw_confidence"] = torch.rand(m, generator=gen) < 0.5
        # The last column is never excluded: row_stats_reference raises when a row excludes every column.
        excl = torch.randint(-1, v, (m, k), generator=gen)
        kw["conf_exclude"] = torch.where(excl == v - 1, -1, excl)
    args = [logits, rows, temperature, ints, torch.randint(0, 1000, (m,), generator=gen),
            torch.randint(0, 1 << 20, (m,), generator=gen)]
    return [t.to(device) for t in args], {name: t.to(device) for name, t in kw.items()}


def perturbed_gap(logits, rows, temperature, seed, step, position):
    """Per row: the gap between the two best reference scores z + G (fp64), inf at T = 0 (no exemption)."""
    x = logits.double()[rows.long()]
    hot = temperature > 0
    z = x / torch.where(hot, temperature.double(), torch.ones_like(temperature, dtype=torch.float64))[:, None]
    noisy = z + counter_gumbel(seed, step, position, STREAM_SAMPLE, x.shape[1]).double()
    if x.shape[1] == 1:
        return torch.full_like(temperature, float("inf"), dtype=torch.float64)
    top = noisy.topk(2, dim=-1).values
    return torch.where(hot, top[:, 0] - top[:, 1], float("inf"))


def check(got, args, kw, max_near_ties=0):
    """Compare with the fp64 reference; a failure names the row and both values."""
    want = row_stats_reference(args[0].double(), *args[1:], **kw)
    assert torch.equal(got["invalid"], want["invalid"]), f"invalid flags differ: {got['invalid']} vs {want['invalid']}"
    diff = (got["token"] != want["token"]).nonzero().flatten()
    if len(diff):
        gap = perturbed_gap(*args)[diff]
        near = gap < TIE_GAP
        assert near.all(), (f"tokens differ at rows {diff[~near].tolist()}: kernel {got['token'][diff].tolist()}, "
                            f"reference {want['token'][diff].tolist()}, perturbed gap {gap.tolist()}")
        assert len(diff) <= max_near_ties, f"{len(diff)} near-tie token differences"
    same = got["token"] == want["token"]  # scores of swapped near-ties describe different tokens
    top1 = want["top1"].double()
    bounds = {"prob": RTOL * want["prob"].double().abs(), "top1": RTOL * top1, "margin": 2 * RTOL * top1,
              "neg_entropy": RTOL * (1 + want["neg_entropy"].double().abs() - 2 * top1.log())}
    for key in SCORES:
        g, w = got[key].double(), want[key].double()
        assert torch.equal(g.isnan(), w.isnan()), f"{key}: NaN pattern differs"
        err = (g - w).abs().nan_to_num(0.0)
        if key == "prob":
            err = torch.where(same, err, 0.0)
        bad = err > bounds[key].nan_to_num(0.0)
        if bad.any():
            i = int(err.sub(bounds[key].nan_to_num(0.0)).argmax())
            raise AssertionError(f"{key} row {i}: kernel {g[i].item():.9g}, reference {w[i].item():.9g}, "
                                 f"error {err[i].item():.3g} > bound {bounds[key][i].item():.3g}")
    return want


CASES = [  # (V, dtype, block_v)
    (1, F32, None), (2, F32, None), (7, F32, 16), (1000, F32, 64), (1000, F16, None), (4097, F32, 1024),
    (4097, F16, None), (4097, BF16, 1024),
]


@pytest.mark.parametrize("v,dtype,block_v", CASES, ids=[f"V{c[0]}-{str(c[1])[6:]}-b{c[2]}" for c in CASES])
def test_matches_reference(v, dtype, block_v):
    args, kw = make_args(5, v, 24, dtype, seed=v)
    check(row_stats(*args, **kw, block_v=block_v), args, kw)
    args, kw = make_args(5, v, 12, dtype, seed=v + 1, raw=False)
    check(row_stats(*args, block_v=block_v), args, kw)


@pytest.mark.parametrize("v,dtype", [(126464, F32), (152064, BF16)])
def test_real_vocabularies(v, dtype):
    """One hot row and one at T = 0 of a real vocabulary size."""
    args, kw = make_args(2, v, 2, dtype, seed=v, raw=False)
    args[1] = torch.tensor([1, 0], device=DEVICE, dtype=torch.int32)
    args[2] = torch.tensor([0.8, 0.0], device=DEVICE)
    check(row_stats(*args), args, kw)


def test_ties_take_the_smallest_index():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0], [3.0] * 5], device=DEVICE)
    logits = torch.cat((logits, torch.full((2, 5), -1.0, device=DEVICE)), 1).repeat(1, 4)[:, :37]  # ties across tiles
    zeros = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    for block_v in (16, 64):
        got = row_stats(logits, torch.arange(2, device=DEVICE), torch.zeros(2, device=DEVICE), zeros, zeros, zeros,
                        block_v=block_v)
        assert got["token"].tolist() == [1, 0]
        assert got["margin"].tolist() == [0.0, 0.0]  # a repeated maximum is also the second largest


def test_single_finite_entry_and_all_minus_inf_tiles():
    """Rows whose first tiles hold only -inf (and one row with a single finite logit) merge without NaN."""
    logits = torch.randn(3, 100, device=DEVICE)
    logits[:, :40] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 77] = 0.5
    args = [logits, torch.arange(3, device=DEVICE), torch.tensor([0.0, 1.0, 1.5], device=DEVICE),
            *[torch.arange(3, device=DEVICE)] * 3]
    got = row_stats(*args, block_v=16)
    check(got, args, {})
    assert got["token"][1] == 77 and got["prob"][1] == 1 and got["margin"][1] == 1 and got["neg_entropy"][1] == 0
    assert (got["token"] >= 40).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf of discarded rows
def test_invalid_rows_leave_others_unaffected():
    args, kw = make_args(6, 300, 6, F32, seed=9)
    logits, rows = args[0], torch.arange(6, device=DEVICE)
    args[1] = rows
    logits[1, 17] = float("nan")
    logits[3, 299] = float("inf")
    logits[4] = float("-inf")
    kw["raw_confidence"][:] = torch.tensor([False, False, True, True, True, False])
    kw["conf_exclude"][5] = torch.tensor([-1, 3, -1])
    got = row_stats(*args, **kw, block_v=64)
    check(got, args, kw)
    assert got["invalid"].tolist() == [0, 1, 0, 1, 1, 0]
    assert got["token"][[1, 3, 4]].tolist() == [-1, -1, -1]
    assert all(got[key][[1, 3, 4]].isnan().all() for key in SCORES)
    ok = torch.tensor([0, 2, 5], device=DEVICE)
    alone = row_stats(*[a[ok] if a.shape[0] == 6 and i else a for i, a in enumerate(args)],
                      **{name: t[ok] for name, t in kw.items()}, block_v=64)
    for key in got:
        assert torch.equal(got[key][ok], alone[key]), key


def test_excluded_token_scores_zero():
    """A raw-confidence row that excludes its own argmax at T = 0 samples it with prob 0; an unused -1 slot and
    a non-raw row's exclusions change nothing."""
    logits = torch.tensor([[0.0, 4.0, 1.0, 2.0]] * 2, device=DEVICE)
    zeros = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    raw = torch.tensor([True, False], device=DEVICE)
    excl = torch.tensor([[1, -1], [1, 3]], device=DEVICE)
    args = [logits, torch.arange(2, device=DEVICE), torch.zeros(2, device=DEVICE), zeros, zeros, zeros]
    got = check(row_stats(*args, raw_confidence=raw, conf_exclude=excl), args,
                {"raw_confidence": raw, "conf_exclude": excl})
    assert got["token"].tolist() == [1, 1] and got["prob"][0] == 0 and got["prob"][1] > 0.8


def test_repeats_order_block_sizes_and_out():
    """Repeated rows with the same arguments agree bitwise; a permuted batch permutes the outputs bitwise;
    other tile sizes give the same tokens and flags, and scores within summation-order rounding."""
    args, kw = make_args(4, 1000, 24, F32, seed=11)
    args[1] = torch.tensor([3, 0, 3, 1, 2, 3] * 4, device=DEVICE)
    for t in (*args[2:], *kw.values()):
        t[6:] = t[:6].repeat(3, *[1] * (t.ndim - 1))
    base = row_stats(*args, **kw, block_v=64)
    check(base, args, kw)
    assert all(torch.equal(base[key][6:], base[key][:6].repeat(3)) for key in base)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    permuted = row_stats(args[0], *[a[perm] for a in args[1:]], **{n: t[perm] for n, t in kw.items()}, block_v=64)
    assert all(torch.equal(permuted[key], base[key][perm]) for key in base)
    for block_v in (16, 1024):
        out = {key: torch.full_like(t, -7) for key, t in base.items()}
        got = row_stats(*args, **kw, block_v=block_v, out=out)
        assert got is out and torch.equal(got["token"], base["token"]) and torch.equal(got["invalid"], base["invalid"])
        for key in SCORES:
            torch.testing.assert_close(got[key], base[key], rtol=1e-6, atol=1e-6)


def test_strided_logits():
    args, kw = make_args(5, 300, 8, F16, seed=12)
    wide = torch.zeros(5, 333, dtype=F16, device=DEVICE)
    wide[:, 10:310] = args[0]
    args[0] = wide[:, 10:310]
    check(row_stats(*args, **kw, block_v=128), args, kw)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampler_chi_square(temperature):
    """1e5 draws of one 6-way row (distinct positions) follow softmax(x / T)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 100_000
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, 1.1, -0.4]], device=DEVICE)
    zeros = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    got = row_stats(logits, zeros, torch.full((n,), temperature, device=DEVICE), zeros + 1234, zeros + 5,
                    torch.arange(n, device=DEVICE))
    counts = torch.bincount(got["token"].cpu(), minlength=6).double()
    expected = torch.softmax(logits[0].double().cpu() / temperature, 0) * n
    p = scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue
    assert p > 1e-4, f"chi-square p = {p:.3g}: counts {counts.tolist()}, expected {expected.tolist()}"


def _bad(**changes):
    args, kw = make_args(3, 10, 4, F32)
    names = ("logits", "rows", "temperature", "seed", "step", "position")
    base = dict(zip(names, args, strict=True)) | kw
    return base | {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in changes.items()}


@pytest.mark.parametrize("args,message", [
    (lambda: _bad(logits=torch.zeros(3, 10, dtype=torch.float64)), "logits must be float32, float16 or bfloat16"),
    (lambda: _bad(logits=torch.zeros(10, 3).t()), "contiguous last dimension"),
    (lambda: _bad(rows=torch.zeros(4)), "rows must be int64 or int32"),
    (lambda: _bad(temperature=torch.zeros(4, dtype=torch.float64)), "temperature must be float32"),
    (lambda: _bad(seed=torch.zeros(5, dtype=torch.int64)), "seed must have 4 entries \\(M, as rows\\), got 5"),
    (lambda: _bad(raw_confidence=torch.zeros(4, dtype=torch.int64)), "raw_confidence must be bool"),
    (lambda: _bad(conf_exclude=torch.zeros(4, 5, dtype=torch.int64)), "at most 4 columns"),
    (lambda: _bad(block_v=48), "block_v must be a power of two"),
    (lambda: _bad(out={"token": torch.zeros(4, dtype=torch.int64)}), "out must be a dict with the keys"),
])
def test_rejects_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        row_stats(**args())


@triton.jit
def _noise_kernel(seed_ptr, step_ptr, pos_ptr, u_ptr, g_ptr, C: tl.constexpr):
    i = tl.program_id(0)
    key = noise_tl.row_key(tl.load(seed_ptr + i), tl.load(step_ptr + i), tl.load(pos_ptr + i), 1)
    cols = tl.arange(0, C)
    tl.store(u_ptr + i * C + cols, noise_tl.uniform(key, cols))
    tl.store(g_ptr + i * C + cols, noise_tl.gumbel(key, cols))


def test_noise_tl_matches_reference():
    gen = torch.Generator().manual_seed(13)
    seed = torch.cat((torch.randint(-(2 ** 62), 2 ** 62, (6,), generator=gen), torch.tensor([0, -1]))).to(DEVICE)
    step, pos = (torch.randint(0, 1 << 31, (8,), generator=gen).to(DEVICE) for _ in range(2))
    u, g = (torch.empty(8, 64, device=DEVICE) for _ in range(2))
    _noise_kernel[(8,)](seed, step, pos, u, g, C=64)
    assert torch.equal(u, counter_uniform(seed, step, pos, STREAM_SAMPLE, 64))
    torch.testing.assert_close(g, counter_gumbel(seed, step, pos, STREAM_SAMPLE, 64), rtol=0, atol=1e-6)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("v", [126464, 152064])
@pytest.mark.parametrize("m", [1, 32, 1024])
def test_full_shapes_on_gpu(m, v, dtype):
    args, kw = make_args(64, v, m, dtype, seed=m + v)
    check(row_stats(*args, **kw), args, kw, max_near_ties=max(1, m // 200))
