"""The vectorised torch commit (kernels/commit_torch.py) against ``commit_reference``, exactly.

Every comparison is of the canvas after the step, the committed flags and the counters. Random batches mix every
rule, requests of 0, 1 and 2 rows, tied scores, counts past the row count, thresholds above every score, factors
in 0.1..3, entropy budgets in 0..5 met exactly (entropies that are sums of powers of two) and revision bounds met
exactly; hand-worked cases pin the rules (the Fast-dLLM factor quirk, the threshold fallback, the entropy loop
stopping at its first failure).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from commit_checks import assert_same

from diffuse_engine import ops
from diffuse_engine.commit_batch import CommitBatch
from diffuse_engine.kernels.commit_torch import commit_torch
from diffuse_engine.kernels.reference import (
    COMMIT_ENTROPY,
    COMMIT_FACTOR,
    COMMIT_THRESHOLD,
    COMMIT_TOPK,
    commit_reference,
)

MASK = 126336
MODES = (COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY)
# Few distinct values: ties; 1.0 / 0.75 / 0.5 are factor bounds 1 - f / (i + 2) for f = 1 (i = 2, 0) and f = 2.
LADDER = torch.tensor([1.0, 0.95, 0.9, 0.75, 0.5, 0.25, 0.0])
# Entropies whose fp64 sums are exact whatever the order; budgets on their partial sums are met exactly.
ENTROPY_SET = torch.tensor([0.0, 0.0, 0.125, 0.25, 0.5, 1.0, 2.0])
GAMMA_SET = torch.tensor([0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0])


def pick(values: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return values[torch.randint(0, len(values), (n,), generator=gen)]


def random_batch(seed: int, num_requests: int, *, max_rows: int = 12, mode: int | None = None,
                 ties: bool = False, revise: bool = True) -> dict:
    """B requests of 0..max_rows candidate rows (often 0, 1 or 2) on distinct slots of a flat canvas, the given
    mode (None: mixed), scores from :data:`LADDER` only (``ties``) or half of them, and with ``revise`` 0..6
    committed revise slots per request."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 3, (num_requests,), generator=gen)
    rows = torch.where(torch.rand(num_requests, generator=gen) < 0.4, small,
                       torch.randint(0, max_rows + 1, (num_requests,), generator=gen))
    nrev = torch.randint(0, 7, (num_requests,), generator=gen) * int(revise)
    m, r = int(rows.sum()), int(nrev.sum())
    size = m + r + 5
    slots = torch.randperm(size, generator=gen)
    canvas = torch.randint(0, 1000, (size,), generator=gen)
    canvas[slots[:m]] = MASK
    score = pick(LADDER, m, gen)
    if not ties:
        score = torch.where(torch.rand(m, generator=gen) < 0.5, score, torch.rand(m, generator=gen))
    entropy = torch.where(torch.rand(m, generator=gen) < 0.7, pick(ENTROPY_SET, m, gen),
                          torch.rand(m, generator=gen) * 4)  # fp32: CPU cumsum adds as Python's sum does
    gamma = torch.where(torch.rand(num_requests, generator=gen) < 0.6, pick(GAMMA_SET, num_requests, gen),
                        torch.rand(num_requests, generator=gen) * 5)
    modes = pick(torch.tensor(MODES), num_requests, gen) if mode is None else torch.full((num_requests,), mode)
    count_kind = torch.randint(0, 5, (num_requests,), generator=gen)
    count = torch.stack([torch.zeros_like(rows), torch.ones_like(rows), rows, rows + 5,
                         (torch.rand(num_requests, generator=gen) * (rows + 1)).long()])
    count = count.gather(0, count_kind[None])[0]
    threshold = torch.where(torch.rand(num_requests, generator=gen) < 0.7,
                            pick(torch.tensor([0.0, 0.5, 0.75, 0.9, 1.0, 1.01, 2.0]), num_requests, gen),
                            torch.rand(num_requests, generator=gen))
    factor = torch.where(torch.rand(num_requests, generator=gen) < 0.5,
                         pick(torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0]), num_requests, gen),
                         0.1 + 2.9 * torch.rand(num_requests, generator=gen))
    args = dict(canvas=canvas, row_offsets=torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)]),
                row_index=slots[:m], token=torch.randint(0, 1000, (m,), generator=gen), score=score,
                entropy=entropy, mode=modes.to(torch.int32), count=count.to(torch.int32), threshold=threshold,
                factor=factor, eb_gamma=gamma)
    if revise:
        bound = pick(torch.tensor([0.0, 0.3, 0.5, 0.75, 1.5]), num_requests, gen)
        rscore = torch.where(torch.rand(r, generator=gen) < 0.4, pick(torch.tensor([0.3, 0.5, 0.75]), r, gen),
                             torch.rand(r, generator=gen))
        args.update(revise_offsets=torch.cat([torch.zeros(1, dtype=torch.long), nrev.cumsum(0)]),
                    revise_index=slots[m:m + r], revise_score=rscore, remask_bound=bound)
    return args


def run_both(args: dict, fn=commit_torch, **kw) -> tuple[tuple, tuple]:
    """``fn`` and the reference on clones of the canvas: (canvas, committed, counters) for each."""
    got_args, want_args = dict(args, canvas=args["canvas"].clone()), dict(args, canvas=args["canvas"].clone())
    got = fn(CommitBatch(mask_id=MASK, **got_args), **kw)
    want = commit_reference(CommitBatch(mask_id=MASK, **want_args))
    return (got_args["canvas"], *got), (want_args["canvas"], *want)


@pytest.mark.parametrize("mode", [*MODES, None], ids=["topk", "threshold", "factor", "entropy", "mixed"])
@pytest.mark.parametrize("ties", [False, True], ids=["mixed_scores", "ties"])
def test_random_batches_match_the_reference(mode, ties):
    for seed in range(24):
        args = random_batch(1000 * seed + (mode or 0), 1 + seed % 9, mode=mode, ties=ties, revise=seed % 3 != 0)
        assert_same(*run_both(args))
        assert_same(*run_both(args, max_rows=20))  # a looser bound gives the same result


def test_random_batches_reach_every_outcome():
    """The random batches see, for each rule, partial commits (0 < k < n), full commits and one-row fallbacks."""
    seen = set()
    for seed in range(40):
        args = random_batch(seed, 8)
        _, counters = commit_reference(CommitBatch(args.pop("canvas").clone(), mask_id=MASK, **args))
        sizes = (args["row_offsets"][1:] - args["row_offsets"][:-1]).tolist()
        for b, ((k, _, _), n) in enumerate(zip(counters.tolist(), sizes, strict=True)):
            if n > 1:
                seen.add((int(args["mode"][b]), "full" if k == n else "one" if k == 1 else "partial" if k else "none"))
    for m in MODES:
        assert {(m, "full"), (m, "partial"), (m, "one")} <= seen, m


def test_large_batch_and_ops_dispatch(monkeypatch, backend_env):
    """64 requests x 32 rows, every rule, through ops.commit: the torch path on CPU is commit_torch."""
    calls = []

    def spy(*a, **kw):
        calls.append(kw.get("max_rows"))
        return commit_torch(*a, **kw)

    backend_env("DIFFUSE_BACKEND", None)
    monkeypatch.setattr(importlib.import_module("diffuse_engine.ops.commit"), "commit_torch", spy)
    args = random_batch(5, 64, max_rows=32)
    assert_same(*run_both(args, fn=ops.commit, max_rows=32))
    backend_env("DIFFUSE_BACKEND", "torch")
    assert_same(*run_both(args, fn=ops.commit))
    assert calls == [32, None]


def one(scores, mode, *, count=0, threshold=0.0, factor=0.0, gamma=0.0, entropy=None, revise=None) -> tuple:
    """One request over rows 0..n-1 of a canvas of n mask slots (tokens 100 + row); ``revise``: (scores, bound)
    of extra committed slots n.. (token 7). Checks against the reference and returns (committed rows, counters)."""
    n = len(scores)
    nr = 0 if revise is None else len(revise[0])
    canvas = torch.cat([torch.full((n,), MASK), torch.full((nr,), 7)])
    args = dict(canvas=canvas, row_offsets=torch.tensor([0, n]), row_index=torch.arange(n),
                token=torch.arange(n) + 100, score=torch.tensor(scores, dtype=torch.float32),
                entropy=torch.tensor(entropy or [0.0] * n, dtype=torch.float32),
                mode=torch.tensor([mode], dtype=torch.int32), count=torch.tensor([count], dtype=torch.int32),
                threshold=torch.tensor([threshold]), factor=torch.tensor([factor]), eb_gamma=torch.tensor([gamma]))
    if revise is not None:
        args.update(revise_offsets=torch.tensor([0, nr]), revise_index=torch.arange(n, n + nr),
                    revise_score=torch.tensor(revise[0]), remask_bound=torch.tensor([revise[1]]))
    got, want = run_both(args)
    assert_same(got, want)
    return got[1].nonzero().flatten().tolist(), got[2][0].tolist()


def test_topk_by_hand():
    assert one([0.2, 0.9, 0.5, 0.9], COMMIT_TOPK, count=2) == ([1, 3], [2, 0, 2])  # ties by row order
    assert one([0.2, 0.9, 0.5, 0.9], COMMIT_TOPK, count=3) == ([1, 2, 3], [3, 0, 1])
    assert one([0.2, 0.9, 0.5, 0.9], COMMIT_TOPK, count=10) == ([0, 1, 2, 3], [4, 0, 0])
    assert one([0.2, 0.9], COMMIT_TOPK, count=0) == ([], [0, 0, 2])
    # A negative count as the reference's order[:k]: all but the |k| worst rows, k reported as is.
    assert one([0.2, 0.9, 0.5], COMMIT_TOPK, count=-1) == ([1, 2], [-1, 0, 4])
    assert one([0.2, 0.9, 0.5], COMMIT_TOPK, count=-5) == ([], [-5, 0, 8])


def test_threshold_and_its_fallback():
    assert one([0.3, 0.8, 0.8, 0.1], COMMIT_THRESHOLD, threshold=0.8) == ([1, 2], [2, 0, 2])  # >= commits
    # Above every score: the best row only (the first of the tied best).
    assert one([0.3, 0.8, 0.8, 0.1], COMMIT_THRESHOLD, threshold=0.95) == ([1], [1, 0, 3])
    assert one([0.3], COMMIT_THRESHOLD, threshold=2.0) == ([0], [1, 0, 0])
    assert one([0.3, 0.8], COMMIT_THRESHOLD, threshold=-float("inf")) == ([0, 1], [2, 0, 0])


def test_fast_dllm_factor_quirk():
    """i* = the first i >= 1 with c_i < 1 - f / (i + 2), or n - 1; k = i*, except k = n when i* = n - 1."""
    # c_2 = 0 < 1 - 1/4 fails at i = 2 = n - 1: the quirk commits all three, the failing row included.
    assert one([1.0, 0.0, 1.0], COMMIT_FACTOR, factor=1.0) == ([0, 1, 2], [3, 0, 0])
    # The same failure at i = 2 with a fourth row: k = 2.
    assert one([1.0, 0.0, 1.0, 0.0], COMMIT_FACTOR, factor=1.0) == ([0, 2], [2, 0, 2])
    # Two rows: c_1 fails at i = 1 = n - 1, both commit; no failure at all also commits all.
    assert one([0.9, 0.0], COMMIT_FACTOR, factor=1.0) == ([0, 1], [2, 0, 0])
    assert one([1.0, 1.0, 1.0], COMMIT_FACTOR, factor=1.0) == ([0, 1, 2], [3, 0, 0])
    # An early failure: k = 1.
    assert one([0.9, 0.1, 0.1, 0.1], COMMIT_FACTOR, factor=1.0) == ([0], [1, 0, 3])
    # One row: i* = 0 = n - 1, k = 1 whatever the factor.
    assert one([0.0], COMMIT_FACTOR, factor=3.0) == ([0], [1, 0, 0])
    # c_i equal to its bound is not below it: 0.75 = 1 - 1/4 at i = 2 passes, 0.5 < 1 - 1/5 fails at i = 3.
    assert one([1.0, 1.0, 0.75, 0.5, 0.5], COMMIT_FACTOR, factor=1.0) == ([0, 1, 2], [3, 0, 2])


def test_entropy_budget_stops_at_the_first_failure():
    h = [0.5, 0.25, 1.0, 0.0, 2.0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    # Prefix sums minus maxima: 0.25, 0.75, 0.75, 1.75.
    assert one(scores, COMMIT_ENTROPY, entropy=h, gamma=0.5) == ([0, 1], [2, 0, 3])
    assert one(scores, COMMIT_ENTROPY, entropy=h, gamma=0.75) == ([0, 1, 2, 3], [4, 0, 1])  # <= commits
    assert one(scores, COMMIT_ENTROPY, entropy=h, gamma=5.0) == ([0, 1, 2, 3, 4], [5, 0, 0])
    assert one(scores, COMMIT_ENTROPY, entropy=h, gamma=0.0) == ([0], [1, 0, 4])  # always one row
    # Ranked by score, not by row: the rows in score order carry entropies 0.3, 0, 0, 0.2.
    assert one([0.9, 0.5, 0.8, 0.7], COMMIT_ENTROPY, entropy=[0.3, 0.2, 0.0, 0.0], gamma=0.0) == ([0, 2, 3],
                                                                                                  [3, 0, 1])
    # Entropies below 0 (outside the contract) make the spread non-monotone: the loop still stops at its first
    # failure (k = 1), although the prefix of 3 would be within the budget again.
    assert one([0.9, 0.8, 0.7], COMMIT_ENTROPY, entropy=[1.0, 1.0, -1.0], gamma=0.5) == ([0], [1, 0, 2])


def test_revision_by_hand():
    # Scores below the bound are re-masked, one equal to it stays; then the commits.
    assert one([0.2, 0.9], COMMIT_TOPK, count=1, revise=([0.2, 0.5, 0.9], 0.5)) == ([1], [1, 1, 2])
    assert one([], COMMIT_TOPK, count=1, revise=([0.2, 0.1], 0.5)) == ([], [0, 2, 2])


def test_revision_bound_takes_the_score_dtype():
    """The reference compares fp32 scores with a 0-D bound, which is rounded to fp32 first (torch promotion)."""
    s = torch.tensor([0.1], dtype=torch.float32)
    bound = torch.tensor([0.100000002], dtype=torch.float64)  # > s in fp64, == s once rounded to fp32
    assert float(s) < float(bound) and float(bound.float()) == float(s)
    args = dict(canvas=torch.tensor([MASK, 5]), row_offsets=torch.tensor([0, 1]), row_index=torch.tensor([0]),
                token=torch.tensor([3]), score=torch.tensor([0.5]), entropy=torch.tensor([0.0]),
                mode=torch.tensor([0], dtype=torch.int32), count=torch.tensor([1], dtype=torch.int32),
                threshold=torch.zeros(1), factor=torch.zeros(1), eb_gamma=torch.zeros(1),
                revise_offsets=torch.tensor([0, 1]), revise_index=torch.tensor([1]), revise_score=s,
                remask_bound=bound)
    got, want = run_both(args)
    assert_same(got, want)
    assert got[0].tolist() == [3, 5] and got[2].tolist() == [[1, 0, 0]]


def test_signed_zero_scores_tie():
    assert one([-0.0, 0.0, -0.0, 0.0], COMMIT_TOPK, count=2) == ([0, 1], [2, 0, 2])
    assert one([0.0, -0.0, 0.0], COMMIT_THRESHOLD, threshold=0.5) == ([0], [1, 0, 2])


def test_empty_batch_and_no_rows():
    args = random_batch(3, 4, revise=True)
    empty_rows = dict(args, row_offsets=torch.zeros_like(args["row_offsets"]), row_index=args["row_index"][:0],
                      token=args["token"][:0], score=args["score"][:0], entropy=args["entropy"][:0])
    assert_same(*run_both(empty_rows))  # M = 0: re-masking only
    assert_same(*run_both(empty_rows, max_rows=0))
    per_request = ("mode", "count", "threshold", "factor", "eb_gamma", "remask_bound")
    no_requests = {k: v[:1] if k.endswith("offsets") else v[:0] if k in per_request else v for k, v in args.items()}
    got, want = run_both(no_requests)  # B = 0
    assert_same(got, want)
    assert got[2].shape == (0, 3)


def test_offsets_not_starting_at_zero():
    """Rows before row_offsets[0] or past row_offsets[-1] belong to no request, as in the reference's slices."""
    args = random_batch(8, 5, revise=True)
    m = args["row_index"].shape[0]
    args["row_offsets"] = torch.clamp(args["row_offsets"] + 2, max=m)
    args["revise_offsets"] = torch.clamp(args["revise_offsets"] + 1, max=args["revise_index"].shape[0])
    assert_same(*run_both(args))


def test_unknown_mode_raises_as_the_reference():
    args = dict(canvas=torch.full((4,), MASK), row_offsets=torch.tensor([0, 0, 2, 4]), row_index=torch.arange(4),
                token=torch.arange(4), score=torch.tensor([0.1, 0.2, 0.3, 0.4]), entropy=torch.zeros(4),
                count=torch.ones(3, dtype=torch.int32), threshold=torch.zeros(3), factor=torch.zeros(3),
                eb_gamma=torch.zeros(3))
    for fn in (commit_reference, commit_torch):
        with pytest.raises(ValueError, match="unknown commit mode 9 for request 1"):
            fn(CommitBatch(mask_id=MASK, **dict(args, canvas=args["canvas"].clone(), mode=torch.tensor([0, 9, 1]))))
    assert_same(*run_both(dict(args, mode=torch.tensor([7, 0, 1]))))  # a request without rows never reads its mode


def test_argument_checks():
    args = random_batch(2, 3)
    with pytest.raises(ValueError, match="all together"):
        commit_torch(CommitBatch(mask_id=MASK, **dict(args, remask_bound=None)))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="max_rows must be"):
            commit_torch(CommitBatch(mask_id=MASK, **args), max_rows=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_reference():
    for seed in range(6):
        args = random_batch(seed, 16, max_rows=32)
        args["entropy"] = pick(ENTROPY_SET, args["entropy"].shape[0], torch.Generator().manual_seed(seed))
        got_args = {k: v.cuda() for k, v in args.items()}
        got = commit_torch(CommitBatch(mask_id=MASK, **got_args), max_rows=32)
        want = commit_reference(CommitBatch(mask_id=MASK, **args))  # args["canvas"]: a CPU copy, written here
        assert_same((got_args["canvas"].cpu(), *(t.cpu() for t in got)), (args["canvas"], *want))
