"""Shared checks of the native row-stats tests: inputs, the native call, and the comparison with
kernels/reference.py under an fp32 error bound (see tests/test_row_stats_native.py)."""

from __future__ import annotations

import math

import torch

from diffuse_engine import native
from diffuse_engine.kernels import reference as ref

EPS32 = 2.0**-24  # fp32 unit roundoff
NEAR_TIE = 1e-5  # relative gap of the reference's top-two perturbed scores under which either token is accepted
SCORES = ("prob", "top1", "margin", "neg_entropy")
CPU_TILE = 256  # the twin's default tile (columns merged per partial state)

def make_inputs(num_rows: int, vocab: int, *, seed: int = 0, scale: float = 3.0, dtype: torch.dtype = torch.float32,
                temperatures: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 0.7), raw_fraction: float = 0.0,
                device: str = "cpu") -> dict:
    """Random logits [num_rows, vocab] and per-row arguments (rows = arange), cycling through `temperatures`."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=g) * scale).to(dtype)
    temp = torch.tensor([temperatures[i % len(temperatures)] for i in range(num_rows)], dtype=torch.float32)
    kw = {
        "logits": logits, "rows": torch.arange(num_rows), "temperature": temp,
        "seed": torch.randint(-(2**63), 2**63 - 1, (num_rows,), generator=g),
        "step": torch.randint(0, 2**32, (num_rows,), generator=g),
        "position": torch.randint(0, 2**32, (num_rows,), generator=g),
    }
    if raw_fraction:
        kw["raw_confidence"] = torch.rand(num_rows, generator=g) < raw_fraction
    return {k: v.to(device) for k, v in kw.items()}


def run_native(kw: dict) -> dict[str, torch.Tensor]:
    return native.row_stats(kw["logits"], kw["rows"], kw["temperature"], kw["seed"], kw["step"], kw["position"],
                            raw_confidence=kw.get("raw_confidence"), conf_exclude=kw.get("conf_exclude"))


def reference_views(kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's confidence logits c and perturbed scores (z + G, or z at T <= 0) of the selected rows, fp64."""
    x = kw["logits"][kw["rows"]].double()
    temp = kw["temperature"].double()
    hot = temp > 0
    z = x / torch.where(hot, temp, torch.ones_like(temp))[:, None]
    c = z.clone()
    raw = kw.get("raw_confidence")
    if raw is not None:
        xr = x.clone()
        excl = kw.get("conf_exclude")
        if excl is not None:
            cols = excl.reshape(x.shape[0], -1)
            r, k = ((cols >= 0) & raw.bool()[:, None]).nonzero(as_tuple=True)
            xr[r, cols[r, k]] = float("-inf")
        c = torch.where(raw.bool()[:, None], xr, z)
    g = ref.counter_gumbel(kw["seed"], kw["step"], kw["position"], ref.STREAM_SAMPLE, x.shape[1]).double()
    return c, torch.where(hot[:, None], z + g, z)


def score_rtol(c: torch.Tensor) -> torch.Tensor:
    """Per-row relative error bound of the fp32 probabilities: rounding z = x / T perturbs each e^(c - m) by at most
    (|c| + |m|) * eps <= 2 * kappa * eps (kappa = max |c| over the finite entries; doubled for the exp and the
    division), and the sums s, w of e^(c - m) in tiles of CPU_TILE columns (the kernel: ~V/512 per thread, then a
    tree) have a random-walk error of about sqrt(CPU_TILE + V / CPU_TILE) * eps, allowed 4 times."""
    finite = torch.where(torch.isfinite(c), c.abs(), torch.zeros_like(c))
    kappa = finite.max(dim=-1).values
    v = c.shape[-1]
    return EPS32 * (4 * kappa + 4 * math.sqrt(CPU_TILE + v / CPU_TILE) + 8)


def assert_matches_reference(got: dict[str, torch.Tensor], kw: dict, max_near_ties: int = 1) -> None:
    """Native output vs the fp64 reference on the same values (see the module docstring)."""
    ref_kw = {k: v for k, v in kw.items() if k not in ("logits", "rows", "temperature", "seed", "step", "position")}
    if "raw_confidence" in ref_kw:
        ref_kw["raw_confidence"] = ref_kw["raw_confidence"].bool()
    want = ref.row_stats_reference(kw["logits"].double(), kw["rows"], kw["temperature"], kw["seed"], kw["step"],
                                   kw["position"], **ref_kw)
    got = {k: v.cpu() for k, v in got.items()}
    want = {k: v.cpu() for k, v in want.items()}
    assert got["token"].dtype == torch.int64 and got["invalid"].dtype == torch.int32
    assert all(got[k].dtype == torch.float32 for k in SCORES)
    bad = (got["invalid"] != want["invalid"]).nonzero().flatten().tolist()
    assert not bad, f"invalid differs at rows {bad}: got {got['invalid'][bad].tolist()}"
    inv = want["invalid"].bool()
    assert bool((got["token"][inv] == -1).all()), "invalid rows must have token -1"
    for k in SCORES:
        assert bool(got[k][inv].isnan().all()), f"invalid rows must have NaN {k}"

    c, noisy = (t.cpu() for t in reference_views(kw))
    hot = kw["temperature"].cpu() > 0
    differ = (got["token"] != want["token"]) & ~inv
    if bool(differ.any()):
        top2 = noisy.topk(min(2, noisy.shape[1]), dim=-1).values
        gap = top2[:, 0] - top2[:, -1] if noisy.shape[1] > 1 else torch.full_like(top2[:, 0], float("inf"))
        near = hot & (gap <= NEAR_TIE * top2[:, 0].abs().clamp(min=1.0))
        unexplained = (differ & ~near).nonzero().flatten().tolist()
        assert not unexplained, (f"tokens differ at rows {unexplained}: got {got['token'][unexplained].tolist()}, "
                                 f"want {want['token'][unexplained].tolist()}")
        assert int(differ.sum()) <= max_near_ties, f"{int(differ.sum())} near-tie token flips: too many"

    ok = ~inv
    rtol = score_rtol(c)
    same = ok & ~differ
    checks = {
        "prob": (same, rtol * want["prob"].double()),
        "top1": (ok, rtol * want["top1"].double()),
        "margin": (ok, 2 * rtol * want["top1"].double()),
        "neg_entropy": (ok, rtol * (2 + math.log(c.shape[1]) + want["neg_entropy"].double().abs())),
    }
    for k, (rows, tol) in checks.items():
        err = (got[k].double() - want[k].double()).abs()
        over = rows & ~(err <= tol)
        if bool(over.any()):
            i = int(over.nonzero()[0, 0])
            raise AssertionError(f"{k} row {i}: got {got[k][i].item()!r}, want {want[k][i].item()!r} (|diff| "
                                 f"{err[i].item():.3g} > tol {tol[i].item():.3g}); {int(over.sum())} rows over")
