"""Native commit (csrc/commit.cuh, commit.cu, commit_cpu.cpp) against kernels/reference.py commit_reference.

The canvas after the call, the committed flags and the counters must equal the reference's exactly (the k rules
run in fp64 as the reference's Python floats). Tests that need the native module skip when it is not built, unless
``DIFFUSE_REQUIRE_NATIVE=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import native, ops
from diffuse_engine.commit_batch import CommitBatch
from diffuse_engine.kernels import reference as ref

MASK_ID = 126336
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MODES = (ref.COMMIT_TOPK, ref.COMMIT_THRESHOLD, ref.COMMIT_FACTOR, ref.COMMIT_ENTROPY)


# ------------------------------------------------------------------------------------------------- helpers
def make_batch(seed: int, *, num_requests: int | None = None, rows: int | tuple[int, int] = (0, 40),
               revise: bool = True, modes: tuple[int, ...] = MODES, device: str = "cpu") -> dict:
    """A random batch: request b owns a canvas region of 64 + 8 slots; its candidate rows are distinct masked
    slots, its revise slots distinct committed slots of the same region. Scores and entropies come from coarse
    grids, so ties are frequent."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    b = num_requests if num_requests is not None else int(torch.randint(1, 7, (1,), generator=g))
    region = 48 if isinstance(rows, tuple) and rows[1] <= 40 else (rows if isinstance(rows, int) else rows[1]) + 8
    canvas = torch.randint(0, 1000, (b * region,), generator=g)
    offsets, index, rev_offsets, rev_index = [0], [], [0], []
    for r in range(b):
        n = rows if isinstance(rows, int) else int(torch.randint(rows[0], rows[1] + 1, (1,), generator=g))
        slots = r * region + torch.randperm(region, generator=g)
        index.append(slots[:n])
        canvas[slots[:n]] = MASK_ID
        nrev = int(torch.randint(0, region - n + 1, (1,), generator=g)) if revise else 0
        rev_index.append(slots[n:n + nrev])
        offsets.append(offsets[-1] + n)
        rev_offsets.append(rev_offsets[-1] + nrev)
    m = offsets[-1]
    row_index = torch.cat(index)
    score = torch.randint(0, 21, (m,), generator=g).float() / 20  # grid of 0.05: ties
    score = torch.where(torch.rand(m, generator=g) < 0.3, torch.rand(m, generator=g), score)
    entropy = torch.randint(0, 8, (m,), generator=g).float() / 40
    entropy = torch.where(torch.rand(m, generator=g) < 0.3, torch.rand(m, generator=g) * 0.2, entropy)
    kw = {
        "canvas": canvas, "row_offsets": torch.tensor(offsets), "row_index": row_index,
        "token": torch.randint(0, 1000, (m,), generator=g), "score": score, "entropy": entropy,
        "mode": torch.tensor([pick(modes) for _ in range(b)], dtype=torch.int32),
        "count": torch.tensor([pick((0, 1, 2, 5, 100, int(torch.randint(0, 41, (1,), generator=g))))
                               for _ in range(b)], dtype=torch.int32),
        "threshold": torch.tensor([pick((0.0, 0.5, 1.01, 0.9, 0.7)) for _ in range(b)]),
        "factor": torch.tensor([pick((0.5, 1.0, 2.0)) for _ in range(b)]),
        "eb_gamma": torch.tensor([pick((0.0, 0.1, 10.0, 0.3)) for _ in range(b)]),
    }
    if revise:
        rev = torch.cat(rev_index)
        kw.update(revise_offsets=torch.tensor(rev_offsets), revise_index=rev,
                  revise_score=torch.randint(0, 11, (rev.shape[0],), generator=g).float() / 10,
                  remask_bound=torch.tensor([pick((0.0, 0.3, 0.5, 1.5)) for _ in range(b)]))
    return {k: v.to(device) for k, v in kw.items()}


def call(fn, kw: dict):
    batch = CommitBatch(**dict(kw, canvas=kw["canvas"].clone()), mask_id=MASK_ID)
    committed, counters = fn(batch)
    return batch.canvas, committed, counters


def assert_matches_reference(kw: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    got = call(native.commit, kw)
    want = call(ref.commit_reference, {k: v.cpu() for k, v in kw.items()})
    for name, g_, w_ in zip(("canvas", "committed", "counters"), got, want, strict=True):
        assert g_.dtype == w_.dtype, name
        assert torch.equal(g_.cpu(), w_), f"{name}: native {g_.cpu().tolist()} vs reference {w_.tolist()}"
    return got


# ---------------------------------------------------------------------------------------------------- CPU twin
@pytest.mark.parametrize("seed", range(40))
def test_random_batches_match_reference(module, seed):
    """Batches of 1-6 requests with 0-40 rows, all modes mixed, tied scores, revision on and off."""
    for rep in range(6):
        assert_matches_reference(make_batch(1000 * seed + rep, revise=rep % 2 == 0))


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_with_edges(module, mode):
    """One mode per batch, every count / threshold / factor / gamma edge, request sizes 0, 1, 2 and 40."""
    for seed in range(12):
        for rows in (0, 1, 2, 40):
            kw = make_batch(seed, num_requests=6, rows=rows, revise=seed % 3 != 0, modes=(mode,))
            kw["count"] = torch.tensor([0, 1, rows, rows + 1, 100, 2], dtype=torch.int32)
            kw["threshold"] = torch.tensor([0.0, 0.5, 1.01, 0.5, 0.0, 1.01])
            kw["factor"] = torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0, 2.0])
            kw["eb_gamma"] = torch.tensor([0.0, 0.1, 10.0, 0.0, 0.1, 10.0])
            assert_matches_reference(kw)


def test_all_ties_and_signed_zero(module):
    """Equal scores (also -0.0 against 0.0) rank by row order; equal entropies."""
    for mode in MODES:
        kw = make_batch(7, num_requests=3, rows=12, revise=False, modes=(mode,))
        kw["score"] = torch.tensor([0.0, -0.0] * 6 + [0.5] * 12 + [0.9, 0.9, 0.1] * 4)
        kw["entropy"] = torch.full((36,), 0.05)
        kw["count"] = torch.tensor([3, 5, 7], dtype=torch.int32)
        kw["threshold"] = torch.tensor([0.0, 0.5, 0.95])
        kw["factor"] = torch.tensor([1.0, 1.0, 0.3])
        kw["eb_gamma"] = torch.tensor([0.1, 0.0, 0.2])
        assert_matches_reference(kw)


def test_factor_rule_cases(module):
    """Scores around the factor bound 1 - f / (i + 2): all above (k = n), the stop at the last row (k = n too),
    a stop at rank 1."""
    kw = make_batch(3, num_requests=4, rows=4, revise=False, modes=(ref.COMMIT_FACTOR,))
    kw["score"] = torch.tensor([0.99, 0.98, 0.97, 0.96,  # f = 0.5: all above 1 - 0.5 / (i + 2) -> k = n
                                0.99, 0.98, 0.97, 0.10,  # stops at the last rank (i* = n - 1 -> k = n)
                                0.99, 0.50, 0.40, 0.30,  # stops at rank 1 -> k = 1
                                0.75, 0.75, 0.75, 0.75])  # f = 1: equal to the bound 1 - 1/4 at rank 2 (no stop)
    kw["factor"] = torch.tensor([0.5, 0.5, 0.5, 1.0])
    _, _, counters = assert_matches_reference(kw)
    assert counters[:, 0].tolist() == [4, 4, 1, 4]


def test_revision_only_and_counters(module):
    """Requests without candidate rows still re-mask; counters = (k, remasked, n - k + remasked)."""
    kw = make_batch(5, num_requests=4, rows=0, revise=True)
    kw["remask_bound"] = torch.tensor([2.0, 0.0, 0.55, 2.0])
    _, committed, counters = assert_matches_reference(kw)
    assert committed.shape == (0,) and committed.dtype == torch.bool
    assert counters[:, 0].tolist() == [0] * 4 and torch.equal(counters[:, 1], counters[:, 2])


def test_empty_batch(module):
    kw = make_batch(1, num_requests=1, rows=3, revise=False)
    kw.update(row_offsets=torch.zeros(1, dtype=torch.int64), row_index=kw["row_index"][:0],
              token=kw["token"][:0], score=kw["score"][:0], entropy=kw["entropy"][:0],
              **{k: kw[k][:0] for k in ("mode", "count", "threshold", "factor", "eb_gamma")})
    canvas, committed, counters = call(native.commit, kw)
    assert torch.equal(canvas, kw["canvas"]) and committed.shape == (0,) and counters.shape == (0, 3)


def test_largest_request(module):
    kw = make_batch(11, num_requests=2, rows=native.COMMIT_MAX_ROWS, revise=True)
    assert_matches_reference(kw)


def test_binding_guards(module):
    """The binding refuses null pointers and partial revision sets; the twin clamps offsets and skips canvas
    indices out of range instead of writing out of bounds."""
    with pytest.raises(ValueError, match="a data pointer is null"):
        module.commit_cpu(0, 0, 0, 1, *([0] * 4), 0, *([0] * 5), MASK_ID, *([0] * 4), 0, 0, 0)
    kw = make_batch(2, num_requests=1, rows=3, revise=False)
    ptrs = [kw[k].data_ptr() for k in ("canvas",)]
    with pytest.raises(ValueError, match="all set or all null"):
        module.commit_cpu(ptrs[0], kw["canvas"].shape[0], kw["row_offsets"].data_ptr(), 1,
                          *(kw[k].data_ptr() for k in ("row_index", "token", "score", "entropy")), 3,
                          *(kw[k].data_ptr() for k in ("mode", "count", "threshold", "factor", "eb_gamma")), MASK_ID,
                          kw["row_offsets"].data_ptr(), 0, 0, 0, 0, 1, 1)
    canvas = kw["canvas"].clone()
    row_index = torch.tensor([0, 10**9, -1])
    offsets = torch.tensor([-5, 99])  # clamped to [0, 3]
    mode = torch.tensor([ref.COMMIT_TOPK], dtype=torch.int32)
    count = torch.tensor([3], dtype=torch.int32)
    committed = torch.zeros(3, dtype=torch.uint8)
    counters = torch.zeros(1, 3, dtype=torch.int32)
    module.commit_cpu(canvas.data_ptr(), canvas.shape[0], offsets.data_ptr(), 1, row_index.data_ptr(),
                      kw["token"].data_ptr(), kw["score"].data_ptr(), kw["entropy"].data_ptr(), 3, mode.data_ptr(),
                      count.data_ptr(), *(kw[k].data_ptr() for k in ("threshold", "factor", "eb_gamma")), MASK_ID,
                      0, 0, 0, 0, 0, committed.data_ptr(), counters.data_ptr())
    assert counters.tolist() == [[3, 0, 0]] and committed.tolist() == [1, 1, 1]
    assert canvas[0] == kw["token"][0] and torch.equal(canvas[1:], kw["canvas"][1:])


def test_module_functions(module):
    for name in ("commit_cpu", "commit_cuda"):
        assert callable(getattr(module, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_call_without_device_raises(module):
    kw = make_batch(2, num_requests=1, rows=3, revise=False)
    args = [kw["canvas"].data_ptr(), kw["canvas"].shape[0], kw["row_offsets"].data_ptr(), 1,
            *(kw[k].data_ptr() for k in ("row_index", "token", "score", "entropy")), 3,
            *(kw[k].data_ptr() for k in ("mode", "count", "threshold", "factor", "eb_gamma")), MASK_ID, 0, 0, 0, 0, 0,
            torch.zeros(3, dtype=torch.uint8).data_ptr(), torch.zeros(1, 3, dtype=torch.int32).data_ptr(), 0]
    with pytest.raises(RuntimeError, match="no CUDA device/driver is available"):
        module.commit_cuda(*args)


# ------------------------------------------------------------------------------------- launcher validation
@pytest.mark.parametrize("case,match", [
    ("canvas_int32", "canvas must be int64"),
    ("canvas_meta", "runs on CPU or CUDA"),
    ("score_fp64", "score must be float32"),
    ("token_length", r"token must have 3 entries \(M, as row_index\)"),
    ("mode_int64", "mode must be int32"),
    ("count_length", r"count must have 2 entries \(B, one per request\)"),
    ("offsets_decreasing", "row_offsets must be non-decreasing"),
    ("offsets_range", r"row_offsets must lie in \[0, 3\]"),
    ("index_range", r"row_index\[1\] = 100000 is outside"),
    ("mode_unknown", "unknown commit mode 7 for request 1"),
    ("count_negative", "count must be >= 0"),
    ("score_nan", "score must not hold NaN"),
    ("revise_partial", "come all together or not at all"),
    ("revise_strided", "revise_index must be contiguous"),
    ("mask_id_float", "mask_id must be an int64 value"),
])
def test_launcher_validation(case, match):
    kw = make_batch(4, num_requests=2, rows=(1, 2), revise=True)
    kw["row_offsets"] = torch.tensor([0, 1, 3])
    kw["row_index"] = torch.tensor([0, 48, 49])
    for k in ("token", "score", "entropy"):
        kw[k] = torch.cat([kw[k], kw[k], kw[k]])[:3].contiguous()
    mask_id = MASK_ID
    if case == "canvas_int32":
        kw["canvas"] = kw["canvas"].int()
    elif case == "canvas_meta":
        kw = {k: v.to("meta") for k, v in kw.items()}
    elif case == "score_fp64":
        kw["score"] = kw["score"].double()
    elif case == "token_length":
        kw["token"] = kw["token"][:2]
    elif case == "mode_int64":
        kw["mode"] = kw["mode"].long()
    elif case == "count_length":
        kw["count"] = kw["count"][:1]
    elif case == "offsets_decreasing":
        kw["row_offsets"] = torch.tensor([0, 2, 1])
    elif case == "offsets_range":
        kw["row_offsets"] = torch.tensor([0, 1, 4])
    elif case == "index_range":
        kw["row_index"] = torch.tensor([0, 100000, 2])
    elif case == "mode_unknown":
        kw["mode"] = torch.tensor([0, 7], dtype=torch.int32)
    elif case == "count_negative":
        kw["count"] = torch.tensor([0, -1], dtype=torch.int32)
    elif case == "score_nan":
        kw["score"] = torch.tensor([0.5, float("nan"), 0.1])
    elif case == "revise_partial":
        del kw["remask_bound"]
    elif case == "revise_strided":
        kw["revise_index"] = torch.zeros(2 * kw["revise_index"].shape[0] + 2, dtype=torch.int64)[::2]
        kw["revise_score"] = torch.zeros(kw["revise_index"].shape[0])
    elif case == "mask_id_float":
        mask_id = 1.5
    with pytest.raises(ValueError, match=match):
        native.commit(CommitBatch(**kw, mask_id=mask_id))


def test_launcher_without_module(monkeypatch):
    monkeypatch.setattr(native, "native_status", lambda: (None, "not built: test"))
    with pytest.raises(ops.BackendUnavailableError, match="not built: test"):
        call(native.commit, make_batch(1))


# ------------------------------------------------------------------------------------------------------- GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("revise", [False, True])
def test_cuda_matches_reference(module, revise):
    """B = 64 requests x 32 rows, all modes mixed, on the device; also equal to the C++ twin."""
    for seed in range(4):
        kw = make_batch(seed, num_requests=64, rows=32, revise=revise, device="cuda")
        got = assert_matches_reference(kw)
        twin = call(native.commit, {k: v.cpu() for k, v in kw.items()})
        for g_, t_ in zip(got, twin, strict=True):
            assert torch.equal(g_.cpu(), t_)


@gpu
@needs_cuda
def test_cuda_odd_sizes_and_side_stream(module):
    """Requests of 0..300 rows (more rows than threads per block) and the largest request, on a side stream."""
    kw = make_batch(9, num_requests=6, rows=(0, 300), revise=True, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        assert_matches_reference(kw)
    side.synchronize()
    assert_matches_reference(make_batch(10, num_requests=3, rows=native.COMMIT_MAX_ROWS, device="cuda"))
