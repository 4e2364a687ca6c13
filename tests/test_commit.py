"""Commit rules (kernels/commit.py) against ``commit_reference``, LLaDA's top-k and Fast-dLLM's threshold rule.

Every result is exact: the canvas after the step, the committed flags and the counters must equal the reference's.
The kernel ranks in fp32 compares and runs the factor and entropy rules in fp64 as the reference's Python floats;
test entropies are fp32 values whose fp64 sums are exact, so the sum order does not matter.
On CPU the kernel runs under the Triton interpreter on small batches; the 64-request batch runs on a GPU (``gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch
from commit_checks import assert_same

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

from diffuse_engine.commit_batch import CommitBatch  # noqa: E402
from diffuse_engine.kernels.commit import commit  # noqa: E402
from diffuse_engine.kernels.reference import (  # noqa: E402
    COMMIT_ENTROPY,
    COMMIT_FACTOR,
    COMMIT_THRESHOLD,
    COMMIT_TOPK,
    commit_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK = 126336
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Score ladder: repeated values make ties; 1.0 / 0.9 / 0.75 / 0.5 straddle the factor bounds 1 - f / (i + 2).
LADDER = torch.tensor([1.0, 0.95, 0.9, 0.75, 0.5, 0.25, 0.0])


def make_batch(seed: int, num_requests: int, revise: bool, max_rows: int = 40, full: bool = False,
               device: str = DEVICE) -> dict:
    """A flat canvas with B requests of 0..max_rows candidate rows each (``full``: max_rows each; distinct slots,
    any order) and, with ``revise``, 0..12 committed revise slots each; all four modes mixed, scores with ties."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, max_rows + 1, (num_requests,), generator=gen)
    rows[torch.randint(0, num_requests, (1,), generator=gen)] = int(torch.randint(0, 2, (1,), generator=gen)) * max_rows
    if full:
        rows.fill_(max_rows)
    nrev = torch.randint(0, 13, (num_requests,), generator=gen) * int(revise)
    m, r = int(rows.sum()), int(nrev.sum())
    size = m + r + 7
    slots = torch.randperm(size, generator=gen)
    canvas = torch.randint(0, 1000, (size,), generator=gen)
    row_index = slots[:m]
    canvas[row_index] = MASK
    pick = torch.rand(m, generator=gen)
    ladder = LADDER[torch.randint(0, len(LADDER), (m,), generator=gen)]
    score = torch.where(pick < 0.5, ladder, torch.rand(m, generator=gen))
    # Entropies: fp32 multiples of 2^-24 below 4 (exact fp64 sums), a quarter of them exactly 0.
    scale = torch.tensor([0.0, 0.03, 0.5, 4.0])[torch.randint(0, 4, (m,), generator=gen)]
    entropy = torch.rand(m, generator=gen) * scale
    modes = torch.tensor([COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY])
    mode = modes[(torch.arange(num_requests) + seed) % 4].to(torch.int32)
    count_pick = torch.randint(0, 4, (num_requests,), generator=gen)
    count = torch.where(count_pick == 0, 0, torch.where(count_pick == 1, 1, torch.where(
        count_pick == 2, rows + 5, torch.randint(0, max_rows + 1, (num_requests,), generator=gen)))).to(torch.int32)
    pick_b = torch.randint(0, 3, (3, num_requests), generator=gen)
    args = dict(
        canvas=canvas, row_offsets=torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)]),
        row_index=row_index, token=torch.randint(0, 1000, (m,), generator=gen), score=score, entropy=entropy,
        mode=mode, count=count, threshold=torch.tensor([0.0, 0.5, 1.01])[pick_b[0]],
        factor=torch.tensor([0.5, 1.0, 2.0])[pick_b[1]], eb_gamma=torch.tensor([0.0, 0.1, 10.0])[pick_b[2]],
    )
    if revise:
        bound = torch.tensor([0.0, 0.3, 0.7, 1.5])[torch.randint(0, 4, (num_requests,), generator=gen)]
        # A score equal to the bound is not below it: it stays committed.
        on_bound = torch.tensor([0.3, 0.7])[torch.randint(0, 2, (r,), generator=gen)]
        revise_score = torch.where(torch.rand(r, generator=gen) < 0.3, on_bound, torch.rand(r, generator=gen))
        args.update(revise_offsets=torch.cat([torch.zeros(1, dtype=torch.long), nrev.cumsum(0)]),
                    revise_index=slots[m:m + r], revise_score=revise_score, remask_bound=bound)
    return {k: v.to(device) for k, v in args.items()}


def run_both(args: dict, **kw) -> tuple:
    """The kernel and the reference on clones of the canvas: (canvas, committed, counters) for each."""
    ref_args, ker_args = dict(args, canvas=args["canvas"].clone()), dict(args, canvas=args["canvas"].clone())
    ref = commit_reference(CommitBatch(mask_id=MASK, **ref_args))
    out = commit(CommitBatch(mask_id=MASK, **ker_args), **kw)
    return (ker_args["canvas"], *out), (ref_args["canvas"], *ref)


@pytest.mark.parametrize("revise", [False, True])
@pytest.mark.parametrize("seed", range(24))
def test_matches_reference(seed, revise):
    args = make_batch(seed, num_requests=1 + seed % 6, revise=revise)
    assert_same(*run_both(args, max_rows=40))


def test_batches_cover_each_rule():
    """The random batches reach, for every mode, a step that commits some but not all rows (0 < k < n)."""
    partial = set()
    for seed in range(10):
        args = make_batch(seed, num_requests=1 + seed % 6, revise=False)
        _, counters = commit_reference(CommitBatch(mask_id=MASK, **dict(args, canvas=args["canvas"].clone())))
        for b, (k, _, left) in enumerate(counters.tolist()):
            if k > 0 and left > 0:
                partial.add(int(args["mode"][b]))
    assert partial == {COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY}


def test_max_rows_from_offsets_and_small_tile():
    args = make_batch(123, num_requests=5, revise=True, max_rows=9)
    assert_same(*run_both(args))  # max_rows read from row_offsets
    assert_same(*run_both(args, max_rows=9))  # the 16-row minimum tile


def test_all_ties_and_empty_requests():
    args = make_batch(7, num_requests=4, revise=False)
    args["score"] = torch.full_like(args["score"], 0.5)
    args["entropy"] = torch.zeros_like(args["entropy"])
    for mode in (COMMIT_TOPK, COMMIT_THRESHOLD, COMMIT_FACTOR, COMMIT_ENTROPY):
        assert_same(*run_both(dict(args, mode=torch.full_like(args["mode"], mode)), max_rows=40))
    empty = dict(args, row_offsets=torch.zeros_like(args["row_offsets"]))
    assert_same(*run_both(empty, max_rows=0))


def to_flat(x: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor) -> dict:
    """[B, L] canvas, predictions and confidences as the flat rows of the masked positions, in position order."""
    b, length = x.shape
    masked = x == MASK
    rows = masked.sum(1)
    pos = masked.reshape(-1).nonzero().squeeze(1)
    zeros = torch.zeros(b, device=x.device)
    return dict(canvas=x.reshape(-1).clone(), row_offsets=torch.cat([rows.new_zeros(1), rows.cumsum(0)]),
                row_index=pos, token=x0.reshape(-1)[pos], score=conf.reshape(-1)[pos],
                entropy=torch.zeros(pos.shape[0], device=x.device), count=torch.zeros(b, dtype=torch.int32),
                threshold=zeros, factor=zeros, eb_gamma=zeros, mask_id=MASK)


def make_grid(seed: int, b: int = 4, length: int = 24) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1000, (b, length), generator=gen)
    x[torch.rand(b, length, generator=gen) < 0.6] = MASK
    x[:, 0] = MASK  # every request has a masked position
    x0 = torch.randint(0, 1000, (b, length), generator=gen)
    # Distinct confidences: torch.topk's order among ties is unspecified.
    conf = (torch.randperm(b * length, generator=gen).reshape(b, length).float() + 1) / (b * length + 1)
    return x, x0, conf


@pytest.mark.parametrize("seed", range(3))
def test_llada_topk(seed):
    x, x0, conf = make_grid(seed)
    masked = x == MASK
    num_transfer = torch.minimum(torch.tensor([1, 2, 5, 100]), masked.sum(1))
    # LLaDA: top-k of the masked confidences per row, then x[transfer] = x0[transfer].
    confidence = torch.where(masked, conf, -torch.inf)
    transfer = torch.zeros_like(masked)
    for j in range(x.shape[0]):
        _, idx = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer[j, idx] = True
    want = torch.where(transfer, x0, x)

    flat = to_flat(x, x0, conf)
    flat.update(mode=torch.full((x.shape[0],), COMMIT_TOPK, dtype=torch.int32), count=num_transfer.to(torch.int32))
    canvas = flat["canvas"]
    committed, counters = commit(CommitBatch(**flat), max_rows=x.shape[1])
    assert torch.equal(canvas.reshape(x.shape), want)
    assert torch.equal(counters[:, 0], num_transfer.to(torch.int32))
    assert int(committed.sum()) == int(transfer.sum())


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.01])
def test_fast_dllm_threshold(threshold):
    x, x0, conf = make_grid(11)
    masked = x == MASK
    # Fast-dLLM: commit every masked position with confidence >= threshold, and always the most confident one.
    confidence = torch.where(masked, conf, -torch.inf)
    transfer = confidence >= threshold
    transfer[torch.arange(x.shape[0]), confidence.argmax(1)] = True
    want = torch.where(transfer, x0, x)

    flat = to_flat(x, x0, conf)
    flat.update(mode=torch.full((x.shape[0],), COMMIT_THRESHOLD, dtype=torch.int32),
                threshold=torch.full((x.shape[0],), threshold))
    canvas = flat["canvas"]
    commit(CommitBatch(**flat), max_rows=x.shape[1])
    assert torch.equal(canvas.reshape(x.shape), want)


def test_validation():
    args = make_batch(3, num_requests=3, revise=True)

    def call(mask_id=MASK, max_rows=None, **changes):
        return commit(CommitBatch(**dict(args, **changes), mask_id=mask_id), max_rows=max_rows)

    with pytest.raises(ValueError, match="canvas must be int64"):
        call(canvas=args["canvas"].int())
    with pytest.raises(ValueError, match="canvas must be contiguous"):
        call(canvas=torch.zeros(2 * args["canvas"].shape[0], dtype=torch.long)[::2])
    with pytest.raises(ValueError, match="score must be float32"):
        call(score=args["score"].double())
    with pytest.raises(ValueError, match=r"token must have \d+ entries \(M, as row_index\)"):
        call(token=args["token"][:-1])
    with pytest.raises(ValueError, match="mode must be int32"):
        call(mode=args["mode"].long())
    with pytest.raises(ValueError, match=r"eb_gamma must have 3 entries \(B, one per request\), got 2"):
        call(eb_gamma=args["eb_gamma"][:2])
    with pytest.raises(ValueError, match="all together"):
        call(remask_bound=None)
    with pytest.raises(ValueError, match=r"revise_score must have \d+ entries \(R, as revise_index\)"):
        call(revise_score=args["revise_score"][:-1])
    with pytest.raises(ValueError, match="mask_id must be"):
        call(mask_id=-1)
    with pytest.raises(ValueError, match="mask_id must be"):
        call(mask_id=1.5)
    with pytest.raises(ValueError, match="max_rows must be"):
        call(max_rows=4096)
    with pytest.raises(ValueError, match="row_offsets must be"):
        call(row_offsets=args["row_offsets"][:0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            call(score=args["score"].cpu())


@gpu
@needs_cuda
@pytest.mark.parametrize("revise", [False, True])
def test_gpu_batch_64x32(revise):
    args = make_batch(99, num_requests=64, revise=revise, max_rows=32, full=True)
    assert_same(*run_both(args, max_rows=32))
