"""``kernels.reference.sample_and_score``: the Gumbel-max sampler and the confidence scores.

The distribution test is a chi-square goodness-of-fit test of >= 1e5 draws against ``softmax(logits / T)``
computed in float64. A correct sampler fails such a test with probability equal to the threshold, so the
threshold is set at p > 1e-3 and every key (seed, step, position) is fixed: the draws, hence the test, are
deterministic; with these keys the p-values are far from the threshold. A control checks that the test has
power: the same draws are rejected against the distribution of a 10% different temperature.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest, chisquare

from diffuse_engine.kernels import reference as ref

V = 50
N_DRAWS = 120_000
P_MIN = 1e-3


def _logits(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(12345)
    z = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    z[[3, 17, 29, 41, 44]] = torch.tensor([-9.0, -11.0, -13.0, -14.0, -20.0], dtype=torch.float64)  # rare tail
    return z.to(dtype)


def _keys(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n distinct (step, position) keys under one seed, as the engine uses them."""
    i = torch.arange(n, dtype=torch.int64)
    return torch.full((n,), seed, dtype=torch.int64), i // 4096, i % 4096


def _call(logits: torch.Tensor, temperature: float | list[float], *, seed: int = 0, step=None, position=None,
          **kw) -> dict[str, torch.Tensor]:
    m = logits.shape[0]
    t = torch.as_tensor(temperature, dtype=torch.float32).expand(m).contiguous()
    seeds, steps, positions = _keys(m, seed)
    if step is not None:
        steps = torch.as_tensor(step, dtype=torch.int64).expand(m).contiguous()
    if position is not None:
        positions = torch.as_tensor(position, dtype=torch.int64).expand(m).contiguous()
    return ref.sample_and_score(logits, t, seeds, steps, positions, **kw)


def _binned(observed: torch.Tensor, expected_p: torch.Tensor, n: int) -> tuple[list[float], list[float]]:
    """Merge the categories with expected count < 5 into one bin (and that bin into the next smallest while it
    is still below 5)."""
    expected = (expected_p * n).tolist()
    obs = observed.tolist()
    order = sorted(range(len(expected)), key=lambda i: expected[i])
    e_bins, o_bins = [], []
    acc_e, acc_o = 0.0, 0.0
    for i in order:
        acc_e += expected[i]
        acc_o += obs[i]
        if acc_e >= 5:
            e_bins.append(acc_e)
            o_bins.append(acc_o)
            acc_e, acc_o = 0.0, 0.0
    if acc_e > 0 or acc_o > 0:  # a leftover below 5 joins the last bin
        e_bins[-1] += acc_e
        o_bins[-1] += acc_o
    total_e = sum(e_bins)
    return o_bins, [e * n / total_e for e in e_bins]


@pytest.mark.parametrize("temperature,seed", [(0.5, 11), (1.0, 22), (2.0, 33)])
def test_gumbel_sampler_matches_softmax_chi_square(temperature, seed):
    z = _logits()
    out = _call(z.expand(N_DRAWS, V).contiguous(), temperature, seed=seed)
    counts = torch.bincount(out["token"], minlength=V).to(torch.float64)
    p = torch.softmax(z.to(torch.float64) / temperature, dim=0)
    obs, exp = _binned(counts, p, N_DRAWS)
    assert len(obs) >= 10, "too few bins for a meaningful test"
    stat, pvalue = chisquare(obs, exp)
    assert pvalue > P_MIN, f"T={temperature}: chi2={stat:.1f} over {len(obs)} bins, p={pvalue:.2e}"
    # power: the same draws are clearly not from the distribution at a temperature 10% off
    p_off = torch.softmax(z.to(torch.float64) / (temperature * 1.1), dim=0)
    obs_off, exp_off = _binned(counts, p_off, N_DRAWS)
    assert chisquare(obs_off, exp_off).pvalue < 1e-6


def test_rare_tokens_are_drawn_at_their_rate():
    """The tail is not lost to rounding: fp32 Gumbel noise reaches tokens of probability ~1e-4."""
    z = torch.tensor([0.0, -math.log(1e4)], dtype=torch.float32)  # p(1) = 1 / 10001
    out = _call(z.expand(N_DRAWS, 2).contiguous(), 1.0, seed=5)
    k = int((out["token"] == 1).sum())
    assert binomtest(k, N_DRAWS, 1 / 10001).pvalue > P_MIN, k


def test_fp64_input_is_sampled_from_the_same_law():
    z = _logits(torch.float64)
    out = _call(z.expand(N_DRAWS, V).contiguous(), 1.0, seed=44)
    counts = torch.bincount(out["token"], minlength=V).to(torch.float64)
    obs, exp = _binned(counts, torch.softmax(z, dim=0), N_DRAWS)
    assert chisquare(obs, exp).pvalue > P_MIN
    assert out["prob"].dtype == torch.float64


def test_keys_decide_the_draw():
    z = _logits().expand(64, V).contiguous()
    a = _call(z, 1.0, seed=1)["token"]
    assert torch.equal(a, _call(z, 1.0, seed=1)["token"])  # deterministic
    assert not torch.equal(a, _call(z, 1.0, seed=2)["token"])  # the seed matters
    assert not torch.equal(a, _call(z, 1.0, seed=1, step=7)["token"])  # so does the step
    # a row's draw depends on its key only, not on the other rows
    single = _call(z[5:6], 1.0, seed=1, step=int(_keys(64, 1)[1][5]), position=int(_keys(64, 1)[2][5]))["token"]
    assert int(single) == int(a[5])


# --------------------------------------------------------------------------------------------- greedy
def test_temperature_zero_is_argmax():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, V, generator=g)
    for seed in (0, 1, 2):
        assert torch.equal(_call(z, 0.0, seed=seed)["token"], z.argmax(-1))


def test_ties_at_temperature_zero_take_the_first():
    z = torch.zeros(3, 6)
    z[0, [2, 4]] = 1.0
    z[1, [5, 1]] = 1.0
    out = _call(z, 0.0)
    assert out["token"].tolist() == [2, 1, 0]
    assert torch.allclose(out["prob"].double(), torch.tensor([math.e / (2 * math.e + 4), math.e / (2 * math.e + 4),
                                                              1 / 6], dtype=torch.float64))
    assert torch.allclose(out["margin"], torch.zeros(3), atol=1e-7)


def test_ties_at_positive_temperature_split_evenly():
    z = torch.full((N_DRAWS // 4, 4), float("-inf"))
    z[:, 1] = z[:, 3] = 2.0
    tok = _call(z, 1.0, seed=9)["token"]
    assert set(tok.unique().tolist()) == {1, 3}
    assert binomtest(int((tok == 1).sum()), tok.numel(), 0.5).pvalue > P_MIN


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("raw", [False, True])
def test_single_finite_logit_is_certain(temperature, raw):
    z = torch.full((500, V), float("-inf"))
    z[:, 13] = -3.0
    out = _call(z, temperature, seed=4, raw_confidence=torch.full((500,), raw), top_k=torch.full((500,), 5),
                top_p=torch.full((500,), 0.5))
    assert (out["token"] == 13).all()
    assert (out["prob"] == 1).all() and (out["top1"] == 1).all() and (out["margin"] == 1).all()
    assert out["neg_entropy"].abs().max() < 1e-9


@pytest.mark.parametrize("bad", ["all_inf", "one_nan", "all_nan", "plus_inf"])
def test_invalid_rows_raise(bad):
    z = torch.randn(4, V)
    if bad == "all_inf":
        z[2] = float("-inf")
    elif bad == "one_nan":
        z[1, 7] = float("nan")
    elif bad == "all_nan":
        z[3] = float("nan")
    else:
        z[0, 3] = float("inf")
    for t in (0.0, 1.0):
        with pytest.raises(ValueError):
            _call(z, t)


def test_top_k_one_is_greedy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1000, V, generator=g)
    out = _call(z, 2.0, seed=3, top_k=torch.ones(1000, dtype=torch.int64))
    assert torch.equal(out["token"], z.argmax(-1))
    assert torch.allclose(out["prob"], torch.ones(1000))  # Dream-style: the filtered distribution is a point


def test_top_p_keeps_the_smallest_nucleus():
    """Dream's top_p: drop the tokens after the first whose cumulative probability exceeds top_p."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    z = p.log()
    out = _call(z, 0.0, top_p=torch.tensor([0.7], dtype=torch.float64))
    assert out["token"].item() == 0
    assert out["prob"].item() == pytest.approx(0.5 / 0.8, rel=1e-12)
    assert out["margin"].item() == pytest.approx(0.2 / 0.8, rel=1e-12)
    draws = _call(z.expand(20000, 4).contiguous(), 1.0, seed=8, top_p=torch.full((20000,), 0.7))["token"]
    assert set(draws.unique().tolist()) == {0, 1}
    # top_p = 1 disables the filter
    out = _call(z, 0.0, top_p=torch.tensor([1.0]))
    assert out["prob"].item() == pytest.approx(0.5, rel=1e-12)


# ---------------------------------------------------------------------------------------------- scores
def _fp64_scores(z64: torch.Tensor, token: torch.Tensor) -> dict[str, torch.Tensor]:
    q = torch.softmax(z64, dim=-1)
    top = q.sort(dim=-1, descending=True).values
    return {"prob": q.gather(-1, token[:, None]).squeeze(1), "top1": top[:, 0], "margin": top[:, 0] - top[:, 1],
            "neg_entropy": (q * torch.log(q + 1e-10)).sum(-1)}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0])
def test_scores_match_fp64_formulas(dtype, tol, temperature):
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(300, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    out = _call(z, temperature, seed=6)
    t = temperature if temperature > 0 else 1.0
    want = _fp64_scores(z.double() / t, out["token"])
    for name, value in want.items():
        assert torch.allclose(out[name].double(), value, rtol=tol, atol=tol), name


def test_dream_style_vs_llada_style_confidence():
    """raw_confidence False (Dream): scores from softmax(filter(logits / T)); True (LLaDA): from softmax(logits),
    no temperature, no filter. The token is the same either way."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(400, V, generator=g, dtype=torch.float64) * 2
    temperature = 0.5
    top_k = torch.full((400,), 10)
    raw = torch.zeros(400, dtype=torch.bool)
    raw[::2] = True
    out = _call(z, temperature, seed=2, top_k=top_k, raw_confidence=raw)
    dream = _call(z, temperature, seed=2, top_k=top_k)
    assert torch.equal(out["token"], dream["token"])
    filtered = ref.filter_logits(z / temperature, top_k, torch.ones(400, dtype=torch.float64))
    want_dream = _fp64_scores(filtered, out["token"])
    want_llada = _fp64_scores(z, out["token"])
    for name in ("prob", "top1", "margin", "neg_entropy"):
        want = torch.where(raw, want_llada[name], want_dream[name])
        assert torch.allclose(out[name], want, rtol=1e-12, atol=1e-12), name
        assert torch.allclose(dream[name], want_dream[name], rtol=1e-12, atol=1e-12), name
    assert not torch.allclose(out["prob"][::2], dream["prob"][::2])


def test_conf_exclude():
    """conf_exclude[row] >= 0 removes that column from the LLaDA-style confidence softmax only: the token is
    still sampled from all columns (so an excluded token can be drawn, with confidence 0)."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(6, V, generator=g, dtype=torch.float64)
    z[:, 20] = 5.0  # the argmax of every row
    raw = torch.tensor([True, True, True, False, False, True])
    exclude = torch.tensor([20, 21, -1, 20, -1, 20])
    out = _call(z, 0.0, raw_confidence=raw, conf_exclude=exclude)
    assert (out["token"] == 20).all()
    q_ex20 = torch.softmax(torch.cat([z[:, :20], torch.full((6, 1), float("-inf"), dtype=z.dtype), z[:, 21:]], 1), -1)
    q_ex21 = torch.softmax(torch.cat([z[:, :21], torch.full((6, 1), float("-inf"), dtype=z.dtype), z[:, 22:]], 1), -1)
    q = torch.softmax(z, -1)
    # row 0: excluded token drawn -> confidence 0; top1 / margin over the remaining columns
    assert out["prob"][0] == 0
    assert torch.isclose(out["top1"][0], q_ex20[0].max(), rtol=1e-12)
    # row 1: another column excluded -> renormalised without it
    assert torch.isclose(out["prob"][1], q_ex21[1, 20], rtol=1e-12)
    # row 2 (-1), rows 3-4 (Dream-style rows ignore the exclusion): the plain softmax
    for r in (2, 3, 4):
        assert torch.isclose(out["prob"][r], q[r, 20], rtol=1e-12), r
    assert out["prob"][5] == 0
    # sampled rows: the excluded token is still drawn at its full rate
    zz = torch.zeros(20000, 2, dtype=torch.float64)
    res = _call(zz, 1.0, seed=10, raw_confidence=torch.ones(20000, dtype=torch.bool),
                conf_exclude=torch.zeros(20000, dtype=torch.int64))
    k = int((res["token"] == 0).sum())
    assert binomtest(k, 20000, 0.5).pvalue > P_MIN
    assert (res["prob"][res["token"] == 0] == 0).all() and (res["prob"][res["token"] == 1] == 1).all()


def test_vocabulary_of_one():
    out = _call(torch.tensor([[0.3], [-2.0]]), 1.0)
    assert out["token"].tolist() == [0, 0]
    assert (out["prob"] == 1).all()


def test_conf_exclude_several_columns():
    """``conf_exclude`` ``[M, K]``: every listed column leaves the confidence softmax (LLaDA's EOS and EOT at
    temperature 0); -1 entries are unused."""
    g = torch.Generator().manual_seed(10)
    z = torch.randn(3, V, generator=g, dtype=torch.float64)
    z[:, 7] = 4.0
    exclude = torch.tensor([[7, 9], [9, -1], [-1, -1]])
    out = _call(z, 0.0, raw_confidence=torch.ones(3, dtype=torch.bool), conf_exclude=exclude)
    assert (out["token"] == 7).all()
    masked = z.clone()
    masked[0, [7, 9]] = float("-inf")
    masked[1, 9] = float("-inf")
    want = _fp64_scores(masked, out["token"])
    for name in ("prob", "top1", "margin", "neg_entropy"):
        assert torch.allclose(out[name], want[name], rtol=1e-12, atol=1e-12), name
    assert out["prob"][0] == 0


def test_only_requested_scores():
    z = torch.randn(5, V)
    out = _call(z, 0.0, scores=())
    assert set(out) == {"token", "prob", "top1"}
    assert set(_call(z, 0.0, scores=("margin",))) == {"token", "prob", "top1", "margin"}
    with pytest.raises(ValueError, match="scores"):
        _call(z, 0.0, scores=("entropy",))
