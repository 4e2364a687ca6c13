"""The fused LM head + sampling statistics (kernels/lm_head_stats.py) against ``row_stats_reference`` on the fp64
logits ``hidden[rows] @ weight.T``.

On CPU the kernel runs under the Triton interpreter on small shapes; the LLaDA-sized bf16 head runs on a GPU
(marked ``gpu``). Tokens must equal the reference's except where the reference's two competing (perturbed) scores
are within the fp32 accumulation error of the logits; scores must be within twice the error of plain torch in the
input dtype (matmul, then the reference in fp32) plus a floor of 64 fp32 ulps.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

from diffuse_engine.kernels.lm_head_stats import lm_head_stats  # noqa: E402
from diffuse_engine.kernels.reference import STREAM_SAMPLE, counter_gumbel, row_stats_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
EPS32 = torch.finfo(torch.float32).eps
SCORES = ("prob", "top1", "margin", "neg_entropy")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(r, d, v, m, dtype, seed=0, raw=True, device=DEVICE):
    """hidden ``[r, d]`` and weight ``[v, d]`` in ``dtype`` scaled so that logits are O(1..5) (peaked and flat rows
    alike); rows with repeats, out of order; a mix of temperatures (0, < 1, > 1); raw confidence on about half the
    rows with up to three excluded columns."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(r, d, generator=gen) * torch.rand(r, 1, generator=gen) * 3).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5).to(dtype)
    rows = torch.randint(0, r, (m,), generator=gen)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.8])[torch.randint(0, 4, (m,), generator=gen)]
    args = dict(seed=torch.randint(0, 2**62, (m,), generator=gen), step=torch.randint(0, 64, (m,), generator=gen),
                position=torch.randperm(4 * m, generator=gen)[:m])
    kw = {}
    if raw:
        # row_stats_reference raises (instead of flagging) a row whose every column is excluded: small
        # vocabularies get no exclusions here; test_zero_row_ties_and_nan_rows covers that row against the kernel.
        excl = torch.randint(-1, v, (m, 3), generator=gen) if v > 3 else torch.full((m, 3), -1)
        kw = dict(raw_confidence=torch.rand(m, generator=gen) < 0.5, conf_exclude=excl)
    return (*(t.to(device) for t in (hidden, weight, rows, temperature)), {k: t.to(device) for k, t in args.items()},
            {k: t.to(device) for k, t in kw.items()})


def logit_error_bound(hidden, weight, rows):
    """Per-element bound on the fp32-accumulated logits' error: D fp32 multiply-adds of fp32 (or exactly widened
    fp16/bf16) inputs err by at most about D * eps/2 * sum |h_k w_k|; four times that leaves room for the tensor
    cores' internal rounding and any accumulation order."""
    d = hidden.shape[1]
    return 2 * d * EPS32 * (hidden[rows.long()].abs().double() @ weight.abs().double().T)


def check(got, hidden, weight, rows, temperature, args, kw):
    """Compare ``got`` with the fp64 reference: tokens (near-ties only may differ), invalid flags, and scores under
    the 2x-torch rule; a mismatch names the row and the values."""
    x64 = hidden[rows.long()].double() @ weight.double().T
    idx = torch.arange(rows.shape[0], device=rows.device)
    want = row_stats_reference(x64, idx, temperature, **args, **kw)
    plain = row_stats_reference(hidden[rows.long()] @ weight.T, idx, temperature, **args, **kw)
    assert torch.equal(got["invalid"], want["invalid"]), (got["invalid"], want["invalid"])
    ok = want["invalid"] == 0
    assert (got["token"][~ok] == -1).all()
    for key in SCORES:
        assert got[key][~ok].isnan().all(), key

    # Tokens: argmax of the perturbed scores z + G (z = x / T; G = 0 at T <= 0).
    hot = temperature > 0
    t_eff = torch.where(hot, temperature, torch.ones_like(temperature)).double()[:, None]
    g = counter_gumbel(args["seed"], args["step"], args["position"], STREAM_SAMPLE, weight.shape[0]).double()
    score = torch.where(hot[:, None], x64 / t_eff + g, x64 / t_eff)
    tol = logit_error_bound(hidden, weight, rows) / t_eff + 8 * EPS32 * (score.abs() + g.abs() + 1)
    same = got["token"] == want["token"]
    for row in (~same & ok).nonzero().flatten().tolist():
        a, b = int(got["token"][row]), int(want["token"][row])
        assert 0 <= a < weight.shape[0], f"row {row}: token {a} out of range"
        gap = (score[row, b] - score[row, a]).item()
        assert gap <= (tol[row, a] + tol[row, b]).item(), (
            f"row {row}: token {a} vs reference {b}, score gap {gap:.3g} beyond the accumulation error")

    # Scores: the floor is 64 ulps of fp32 relative to (1 + |score|): the fp32 epilogue (exp, log, sums over the
    # vocabulary in another order than torch) and fp32 accumulation errors that grow like sqrt(D) ulps of the logits.
    for key in SCORES:
        use = ok & same & (plain["token"] == want["token"]) if key == "prob" else ok
        err = (got[key].double() - want[key]).abs()
        torch_err = (plain[key].double() - want[key]).abs()[use].max().item() if bool(use.any()) else 0.0
        bound = 2 * torch_err + 64 * EPS32 * (1 + want[key].abs())
        bad = (use & ~(err <= bound)).nonzero().flatten()
        if bad.numel():
            row = int(bad[0])
            raise AssertionError(
                f"{hidden.dtype} {key} at row {row}: kernel {got[key][row].item():.8g}, reference "
                f"{want[key][row].item():.8g}, error {err[row].item():.3g} > bound {bound[row].item():.3g} "
                f"(2 x torch error {torch_err:.3g} + 64 ulp floor); {bad.numel()} rows fail")
    return want


CASES = [(d, v, m, dtype) for i, (d, v) in enumerate((d, v) for d in (16, 64, 96) for v in (1, 7, 1000, 4097))
         for m, dtype in (((1, 5, 33)[i % 3], F32), ((1, 5, 33)[(i + 1) % 3], F16))]
CASES += [(64, 1000, 33, BF16), (96, 4097, 5, BF16)]


@pytest.mark.parametrize("d,v,m,dtype", CASES, ids=[f"D{d}-V{v}-M{m}-{str(t)[6:]}" for d, v, m, t in CASES])
def test_matches_reference(d, v, m, dtype):
    hidden, weight, rows, temperature, args, kw = make_case(11, d, v, m, dtype, seed=d + v + m)
    check(lm_head_stats(hidden, weight, rows, temperature, **args, **kw), hidden, weight, rows, temperature, args,
          kw)


def test_without_raw_confidence():
    hidden, weight, rows, temperature, args, kw = make_case(7, 64, 1000, 33, F32, seed=3, raw=False)
    rows = rows.int()  # int32 row indices are accepted too
    check(lm_head_stats(hidden, weight, rows, temperature, **args), hidden, weight, rows, temperature, args, kw)


def test_large_vocabulary():
    hidden, weight, rows, temperature, args, kw = make_case(2, 16, 126464, 2, F32, seed=4)
    got = lm_head_stats(hidden, weight, rows, temperature, **args, **kw, block_v=4096)
    check(got, hidden, weight, rows, temperature, args, kw)


def test_tiling_and_splits_do_not_change_tokens():
    """Every tiling and split count gives identical tokens, and exact ties go to the smallest column even when
    the tied columns sit in different tiles and splits."""
    hidden, weight, rows, temperature, args, kw = make_case(9, 32, 1000, 33, F32, seed=5)
    h0 = hidden[rows[0]]
    weight[[130, 517, 901]] = 100 * h0 / h0.dot(h0)  # logit 100, far above the rest, three times in row 0
    runs = [lm_head_stats(hidden, weight, rows, temperature, **args, **kw, num_splits=ns, block_v=bv)
            for ns in (1, 3, None) for bv in (16, 64)]
    for out in runs[1:]:
        assert torch.equal(out["token"], runs[0]["token"])
        assert torch.equal(out["invalid"], runs[0]["invalid"])
    check(runs[-1], hidden, weight, rows, temperature, args, kw)
    cold = (temperature[rows == rows[0]] == 0)
    if bool(cold.any()):
        assert (runs[0]["token"][rows == rows[0]][cold] == 130).all()


def test_zero_row_ties_and_nan_rows():
    """A zero hidden row makes every logit 0: token 0 at T = 0, q uniform. A NaN hidden row is invalid; so is a
    raw-confidence row whose every column is excluded (checked directly: the reference raises on that row)."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 16, generator=gen)
    hidden[1] = 0.0
    hidden[2, 3] = float("nan")
    weight = torch.randn(3, 16, generator=gen)
    rows = torch.tensor([1, 2, 0, 1, 0])
    temperature = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0])
    args = dict(seed=torch.arange(5), step=torch.zeros(5, dtype=torch.long), position=torch.arange(5))
    hidden, weight, rows, temperature = (t.to(DEVICE) for t in (hidden, weight, rows, temperature))
    args = {k: t.to(DEVICE) for k, t in args.items()}
    got = lm_head_stats(hidden, weight, rows, temperature, **args)
    check(got, hidden, weight, rows, temperature, args, {})
    assert got["invalid"].tolist() == [0, 1, 0, 0, 0]
    assert got["token"][0].item() == 0
    torch.testing.assert_close(got["prob"][[0, 3]].cpu(), torch.full((2,), 1 / 3))
    torch.testing.assert_close(got["margin"][[0, 3]].cpu(), torch.zeros(2))
    torch.testing.assert_close(got["neg_entropy"][0].cpu(), -torch.log(torch.tensor(3.0)))

    raw = torch.tensor([False, False, False, False, True], device=DEVICE)
    excl = torch.tensor([[-1, -1, -1]] * 4 + [[2, 0, 1]], device=DEVICE)
    got = lm_head_stats(hidden, weight, rows, temperature, **args, raw_confidence=raw, conf_exclude=excl)
    assert got["invalid"].tolist() == [0, 1, 0, 0, 1]
    assert got["token"][4].item() == -1 and got["prob"][4].isnan().item() and got["neg_entropy"][4].isnan().item()


def test_sampler_chi_square():
    """1e5 draws per temperature from one row (distinct positions) follow softmax(logits / T)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n, temps = 100_000, (0.5, 1.0, 2.0)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 16, generator=gen).to(DEVICE)
    weight = (torch.randn(6, 16, generator=gen) / 3).to(DEVICE)
    m = n * len(temps)
    temperature = torch.tensor(temps).repeat_interleave(n).to(DEVICE)
    zeros = torch.zeros(m, dtype=torch.long, device=DEVICE)
    # One program per 16384 rows: the interpreter runs each block as numpy arrays, ~1 s for the 3e5 draws.
    got = lm_head_stats(hidden, weight, zeros, temperature, seed=zeros + 11, step=zeros,
                        position=torch.arange(m, device=DEVICE), block_m=16384, block_v=16)
    logits = (hidden.double() @ weight.double().T)[0].cpu()
    for i, t in enumerate(temps):
        counts = torch.bincount(got["token"][i * n:(i + 1) * n].cpu(), minlength=6).double()
        expected = torch.softmax(logits / t, dim=0) * n
        p = scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue
        assert p > 1e-4, f"T={t}: counts {counts.tolist()} vs expected {expected.tolist()}, p = {p:.2g}"


@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.zeros(7, 16, dtype=F16)), "share one dtype"),
    (dict(hidden=torch.zeros(3, 8), weight=torch.zeros(7, 8)), "at least 16"),
    (dict(conf_exclude=torch.zeros(2, 5, dtype=torch.long)), "K <= 4"),
    (dict(rows=torch.zeros(2)), "rows must be int32 or int64"),
    (dict(temperature=torch.zeros(3)), "temperature must have 2 entries"),
    (dict(seed=torch.zeros(2)), "seed must be integer, got float32"),
    (dict(block_v=24), "powers of two >= 16"),
])
def test_validation(change, message):
    kw = dict(hidden=torch.zeros(3, 16), weight=torch.zeros(7, 16), rows=torch.zeros(2, dtype=torch.long),
              temperature=torch.zeros(2), seed=torch.zeros(2, dtype=torch.long),
              step=torch.zeros(2, dtype=torch.long), position=torch.zeros(2, dtype=torch.long),
              raw_confidence=torch.ones(2, dtype=torch.bool), conf_exclude=None)
    kw.update(change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lm_head_stats(**kw)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 32, 512])
def test_llada_head_bf16(m):
    hidden, weight, rows, temperature, args, kw = make_case(600, 4096, 126464, m, BF16, seed=m)
    check(lm_head_stats(hidden, weight, rows, temperature, **args, **kw), hidden, weight, rows, temperature, args,
          kw)
