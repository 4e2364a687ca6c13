"""Native row stats (csrc/row_stats.cuh, row_stats.cu, row_stats_cpu.cpp) against kernels/reference.py.

The reference runs in fp64 on the same (fp32, fp16 or bf16) logit values; the native op computes in fp32. Tokens
must be equal, except for a sampled row (T > 0) whose reference top-two perturbed scores z + G lie within 1e-5
relative of each other (fp32 rounding of z = x / T and of the sum may order them either way); such rows must be
rare. Scores are compared with the fp32 error bound of :func:`score_rtol`. Tests that need the native module skip
when it is not built, unless ``DIFFUSE_REQUIRE_NATIVE=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import pytest
import torch
from row_stats_checks import (
    SCORES,
    assert_matches_reference,
    make_inputs,
    run_native,
)

from diffuse_engine import native, ops

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------------- C++ twin
@pytest.mark.parametrize("vocab,num_rows", [(1, 16), (2, 32), (7, 64), (1000, 40), (4097, 20), (126464, 5),
                                            (152064, 5)])
def test_cpu_twin_matches_reference(module, vocab, num_rows):
    kw = make_inputs(num_rows, vocab, seed=vocab, raw_fraction=0.3)
    assert_matches_reference(run_native(kw), kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab,num_rows", [(7, 64), (4097, 16), (126464, 3)])
def test_cpu_twin_half_precision(module, dtype, vocab, num_rows):
    kw = make_inputs(num_rows, vocab, seed=vocab + 1, dtype=dtype, raw_fraction=0.3)
    if dtype == torch.float16:  # subnormal, signed-zero and extreme fp16 values through the bit conversion
        kw["logits"][0, :5] = torch.tensor([6e-8, -6e-8, -0.0, 65504.0, -65504.0])[: min(5, vocab)].half()
    assert_matches_reference(run_native(kw), kw)


def test_cpu_twin_fp16_subnormals(module):
    """Rows of fp16 subnormals (k * 2**-24) at T = 2**-24, so z = k: the scores depend on every value exactly."""
    g = torch.Generator().manual_seed(3)
    mant = torch.randint(-1023, 1024, (6, 3000), generator=g)
    kw = make_inputs(6, 3000, seed=4, temperatures=(2.0**-24, 2.0**-22, 0.0))
    kw["logits"] = (mant.double() * 2.0**-24).half()
    assert torch.equal(kw["logits"].double() * 2**24, mant.double())
    assert_matches_reference(run_native(kw), kw)


@pytest.mark.parametrize("scale", [0.01, 10.0, 40.0])
def test_cpu_twin_logit_scales(module, scale):
    """Nearly flat rows and very peaked ones (the exp rescaling of the running max)."""
    kw = make_inputs(48, 3001, seed=5, scale=scale, temperatures=(0.0, 0.25, 1.0, 3.0), raw_fraction=0.5)
    assert_matches_reference(run_native(kw), kw)


def test_ties_pick_smallest_index(module):
    """Equal logits at T = 0 choose the smallest index (as torch.argmax); equal top two give margin 0."""
    vocab = 600
    logits = torch.randn(4, vocab)
    logits[0] = 1.5  # all equal
    logits[1, [17, 250, 599]] = 9.0  # three-way tie for the max, across tiles of the twin
    logits[2, [599, 3]] = 9.0
    logits[3, [300]] = 9.0
    kw = {"logits": logits, "rows": torch.arange(4), "temperature": torch.zeros(4), "seed": torch.zeros(4).long(),
          "step": torch.zeros(4).long(), "position": torch.zeros(4).long()}
    got = run_native(kw)
    assert got["token"].tolist() == [0, 17, 3, 300]
    assert got["margin"][:3].tolist() == [0.0, 0.0, 0.0]
    assert got["top1"][0].item() == pytest.approx(1 / vocab, rel=1e-6)
    assert_matches_reference(got, kw)
    for tile in (1, 7, vocab):
        assert cpu_call(module, kw, tile)["token"].tolist() == [0, 17, 3, 300]


def test_single_finite_entry(module):
    """A row with all but one logit at -inf: that column, q = one-hot (prob = top1 = margin = 1, entropy 0), at any
    temperature; V = 1 likewise."""
    vocab = 5000
    logits = torch.full((3, vocab), float("-inf"))
    logits[0, 4321] = -3.0
    logits[1, 7] = 250.0
    logits[2, 0] = 0.0
    temp = torch.tensor([0.0, 1.0, 0.3])
    kw = {"logits": logits, "rows": torch.arange(3), "temperature": temp, "seed": torch.arange(3),
          "step": torch.zeros(3).long(), "position": torch.ones(3).long()}
    got = run_native(kw)
    assert got["token"].tolist() == [4321, 7, 0]
    for k, v in (("prob", 1.0), ("top1", 1.0), ("margin", 1.0), ("neg_entropy", 0.0)):
        assert got[k].tolist() == [v] * 3, k
    assert got["invalid"].tolist() == [0, 0, 0]
    assert_matches_reference(got, kw)
    one = {**kw, "logits": torch.tensor([[2.5], [-1.0]]), "rows": torch.tensor([1, 0]), "temperature": temp[:2],
           "seed": kw["seed"][:2], "step": kw["step"][:2], "position": kw["position"][:2]}
    got = run_native(one)
    assert got["token"].tolist() == [0, 0] and got["margin"].tolist() == [1.0, 1.0]
    assert_matches_reference(got, one)


def test_invalid_rows_flagged_others_unaffected(module):
    """NaN, +inf and all -inf rows: invalid = 1, token -1, NaN scores, no exception; the other rows give what they
    give alone. A NaN or +inf in an excluded column of a raw-confidence row does not make the row invalid (the
    reference's rule: invalid is decided on the confidence logits)."""
    kw = make_inputs(8, 3000, seed=9)
    x = kw["logits"]
    x[1, 2999] = float("nan")
    x[3, 0] = float("inf")
    x[5] = float("-inf")
    x[6, 100] = float("-inf")  # a valid row with some -inf entries
    kw["temperature"][:] = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0])
    got = run_native(kw)
    assert got["invalid"].tolist() == [0, 1, 0, 1, 0, 1, 0, 0]
    assert_matches_reference(got, kw)
    keep = torch.tensor([0, 2, 4, 6, 7])
    alone = run_native({**kw, "rows": keep, **{k: kw[k][keep] for k in ("temperature", "seed", "step", "position")}})
    for k in ("token", *SCORES, "invalid"):
        assert torch.equal(alone[k], got[k][keep]), k

    raw = {**kw, "raw_confidence": torch.ones(8, dtype=torch.bool),
           "conf_exclude": torch.tensor([[-1], [2999], [-1], [0], [-1], [-1], [-1], [-1]])}
    got = run_native(raw)
    assert got["invalid"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert got["token"][1].item() == 2999 and got["prob"][1].item() == 0.0  # NaN wins the argmax (torch.argmax)
    assert_matches_reference(got, raw)


@pytest.mark.parametrize("as_uint8", [False, True])
def test_raw_confidence_with_exclude(module, as_uint8):
    """Raw rows score softmax(x) with up to 4 excluded columns (entries < 0 unused; [M] and [M, K] shapes); the
    token still comes from z = x / T over every column, so an excluded argmax gets prob 0."""
    kw = make_inputs(12, 2000, seed=13, temperatures=(0.0, 0.6, 1.5))
    x = kw["logits"]
    x[0, 1234] = 50.0
    raw = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    excl = torch.full((12, 4), -1, dtype=torch.int64)
    excl[0, 0] = 1234  # the T = 0 argmax, excluded
    excl[1] = torch.tensor([5, 6, -7, 1999])
    excl[2, 0] = 3  # not a raw row: ignored
    excl[3] = x[3].topk(4).indices  # the four largest logits excluded
    excl[4, 3] = 0
    kw.update(raw_confidence=raw.to(torch.uint8) if as_uint8 else raw, conf_exclude=excl)
    got = run_native(kw)
    assert got["token"][0].item() == 1234 and got["prob"][0].item() == 0.0
    assert_matches_reference(got, kw)
    for k_cols in (1, 3):
        sub = {**kw, "conf_exclude": excl[:, :k_cols].contiguous()}
        assert_matches_reference(run_native(sub), sub)
    flat = {**kw, "conf_exclude": excl[:, 1].contiguous()}
    assert_matches_reference(run_native(flat), flat)
    # conf_exclude without raw_confidence is ignored, as in the reference.
    plain = {k: v for k, v in kw.items() if k != "raw_confidence"}
    base = run_native({k: v for k, v in plain.items() if k != "conf_exclude"})
    for k, v in run_native(plain).items():
        assert torch.equal(v, base[k]), k


def test_row_indices_with_repeats_and_order(module):
    """rows may repeat and come in any order; each selected row has its own temperature and noise key, and rows
    with the same logits row and arguments give identical results."""
    kw = make_inputs(5, 1500, seed=17)
    idx = torch.tensor([3, 0, 3, 1, 1, 4, 2, 3])
    per_row = make_inputs(8, 1, seed=18, temperatures=(1.0, 0.0, 1.0, 0.5, 2.0, 1.0, 0.0, 0.3))
    sel = {**kw, "rows": idx, **{k: per_row[k] for k in ("temperature", "seed", "step", "position")}}
    sel["seed"][2], sel["step"][2], sel["position"][2] = sel["seed"][0], sel["step"][0], sel["position"][0]
    got = run_native(sel)
    assert_matches_reference(got, sel)
    for k in ("token", *SCORES):
        assert torch.equal(got[k][0], got[k][2]), k


def test_deterministic_across_calls(module):
    kw = make_inputs(16, 8191, seed=19, raw_fraction=0.5)
    first = run_native(kw)
    for _ in range(2):
        again = run_native(kw)
        for k, v in first.items():
            assert torch.equal(v.view(torch.int32) if v.is_floating_point() else v,
                               again[k].view(torch.int32) if v.is_floating_point() else again[k]), k


def binding_args(kw: dict, out: dict[str, torch.Tensor]) -> list[int]:
    """The pointer/size arguments of the row_stats_cpu/row_stats_cuda bindings for contiguous [R, V] logits."""
    x, m = kw["logits"], kw["rows"].shape[0]
    raw = kw.get("raw_confidence")
    excl = kw.get("conf_exclude")
    return [x.data_ptr(), native.ROW_STATS_DTYPES[x.dtype], x.shape[0], x.shape[1], x.shape[1], kw["rows"].data_ptr(),
            m, kw["temperature"].data_ptr(), kw["seed"].data_ptr(), kw["step"].data_ptr(), kw["position"].data_ptr(),
            raw.data_ptr() if raw is not None else 0, excl.data_ptr() if excl is not None else 0,
            excl.shape[1] if excl is not None else 0, *(out[k].data_ptr() for k in native.ROW_STATS_KEYS)]


def empty_outputs(m: int) -> dict[str, torch.Tensor]:
    return {"token": torch.empty(m, dtype=torch.int64), "invalid": torch.empty(m, dtype=torch.int32),
            **{k: torch.empty(m) for k in SCORES}}


def cpu_call(module, kw: dict, tile_cols: int) -> dict[str, torch.Tensor]:
    """The twin through the binding with an explicit tile size (the launcher always uses the default)."""
    out = empty_outputs(kw["rows"].shape[0])
    module.row_stats_cpu(*binding_args(kw, out), tile_cols=tile_cols)
    return out


def test_tile_size_invariance(module):
    """The merge is exact: tokens (and invalid flags) do not depend on how a row is cut into tiles; scores agree to
    fp32 rounding of the sums."""
    kw = make_inputs(24, 1111, seed=23, raw_fraction=0.4)
    kw["logits"][5, 7] = float("nan")
    base = cpu_call(module, kw, 256)
    for tile in (1, 2, 7, 64, 1110, 1111, 5000):
        got = cpu_call(module, kw, tile)
        assert torch.equal(got["token"], base["token"]) and torch.equal(got["invalid"], base["invalid"]), tile
        for k in SCORES:
            torch.testing.assert_close(got[k], base[k], rtol=2e-5, atol=2e-6, equal_nan=True)


def test_pruned_noise_gives_the_same_tokens(module):
    """Peaked rows (a few logits far above the rest): most columns skip their Gumbel noise (z + 17 below a score
    already reached); the sampled tokens must still be those of the full reference, for winners early and late in
    the row."""
    num_rows, vocab = 64, 20000
    kw = make_inputs(num_rows, vocab, seed=29, scale=2.0, temperatures=(1.0, 0.5, 2.0, 0.8))
    g = torch.Generator().manual_seed(30)
    for i in range(num_rows):
        cols = torch.randint(0, vocab, (3,), generator=g)
        kw["logits"][i, cols] += 40.0 + 4 * torch.randn(3, generator=g)
    kw["logits"][0, vocab - 1] += 60.0  # the winner is the last column
    kw["logits"][1, 0] += 60.0  # the winner is the first column
    assert_matches_reference(run_native(kw), kw, max_near_ties=0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampler_chi_square(module, temperature):
    """1e5 draws from one row of 6 logits (independent noise: one position per draw) follow softmax(x / T)."""
    from scipy.stats import chisquare

    draws = 100_000
    logits = torch.tensor([[1.0, -0.5, 0.25, 2.0, -3.0, 0.9]])
    kw = {"logits": logits, "rows": torch.zeros(draws, dtype=torch.int64),
          "temperature": torch.full((draws,), temperature), "seed": torch.full((draws,), 1234, dtype=torch.int64),
          "step": torch.full((draws,), 7, dtype=torch.int64), "position": torch.arange(draws)}
    got = run_native(kw)
    counts = torch.bincount(got["token"], minlength=6).double()
    probs = torch.softmax(logits[0].double() / temperature, dim=0)
    result = chisquare(counts.numpy(), (probs * draws).numpy())
    assert result.pvalue > 1e-4, f"chi-square {result.statistic:.1f}, p = {result.pvalue:.2e}; counts {counts}"
    expected = torch.softmax(logits[0] / temperature, dim=0)
    assert torch.allclose(got["prob"], expected[got["token"]], rtol=1e-5)


def test_gumbel_bound_holds():
    """The pruning bound of row_stats.cuh (kGumbelBound = 17) exceeds the largest Gumbel value the noise can take,
    -log(-log(1 - 2**-24)) in fp32."""
    u_max = torch.tensor([1 - 2**-24], dtype=torch.float32)
    assert float(-torch.log(-torch.log(u_max))) < 17.0


# ------------------------------------------------------------------------------------- launcher validation
def _ok(m: int = 3, vocab: int = 5) -> dict:
    return make_inputs(m, vocab, seed=1)


@pytest.mark.parametrize("case,match", [
    ("logits_fp64", "logits must be float32, float16 or bfloat16"),
    ("logits_1d", "logits must be 2-D"),
    ("logits_strided", "logits must have a contiguous last dimension"),
    ("logits_meta", "runs on CPU or CUDA"),
    ("logits_not_tensor", "logits must be a torch.Tensor"),
    ("rows_int32", "rows must be int64"),
    ("rows_2d", "rows must be 1-D"),
    ("rows_out_of_range", r"rows\[1\] = 3 is outside \[0, 3\)"),
    ("rows_negative", r"rows\[0\] = -1 is outside"),
    ("temperature_fp64", "temperature must be float32"),
    ("temperature_length", r"temperature must have 3 entries \(M, as rows\), got 2"),
    ("seed_int32", "seed must be int64"),
    ("step_device", "step is on meta but logits is on cpu"),
    ("position_strided", "position must be contiguous"),
    ("raw_float", "raw_confidence must be bool or uint8"),
    ("exclude_k5", "at most 4 columns per row"),
    ("exclude_int32", "conf_exclude must be int64"),
    ("exclude_rows", r"conf_exclude must be \[M, K\] or \[M\] with M = 3"),
])
def test_launcher_validation(case, match):
    kw = _ok()
    if case == "logits_fp64":
        kw["logits"] = kw["logits"].double()
    elif case == "logits_1d":
        kw["logits"] = kw["logits"][0]
    elif case == "logits_strided":
        kw["logits"] = torch.zeros(5, 3).t()
    elif case == "logits_meta":
        kw = {k: v.to("meta") for k, v in kw.items()}
    elif case == "logits_not_tensor":
        kw["logits"] = [[0.0] * 5] * 3
    elif case == "rows_int32":
        kw["rows"] = kw["rows"].int()
    elif case == "rows_2d":
        kw["rows"] = kw["rows"][:, None]
    elif case == "rows_out_of_range":
        kw["rows"] = torch.tensor([0, 3, 1])
    elif case == "rows_negative":
        kw["rows"] = torch.tensor([-1, 0, 1])
    elif case == "temperature_fp64":
        kw["temperature"] = kw["temperature"].double()
    elif case == "temperature_length":
        kw["temperature"] = kw["temperature"][:2]
    elif case == "seed_int32":
        kw["seed"] = kw["seed"].int()
    elif case == "step_device":
        kw["step"] = kw["step"].to("meta")
    elif case == "position_strided":
        kw["position"] = torch.zeros(6, dtype=torch.int64)[::2]
    elif case == "raw_float":
        kw["raw_confidence"] = torch.ones(3)
    elif case == "exclude_k5":
        kw.update(raw_confidence=torch.ones(3, dtype=torch.bool), conf_exclude=torch.zeros(3, 5, dtype=torch.int64))
    elif case == "exclude_int32":
        kw["conf_exclude"] = torch.zeros(3, 2, dtype=torch.int32)
    elif case == "exclude_rows":
        kw["conf_exclude"] = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        run_native(kw)


def test_launcher_without_module(monkeypatch):
    monkeypatch.setattr(native, "native_status", lambda: (None, "not built: test"))
    with pytest.raises(ops.BackendUnavailableError, match="not built: test"):
        run_native(_ok())


def test_launcher_shapes_and_strided_rows(module):
    """Empty selections, and logits whose rows are a strided view (row stride > V) of a wider buffer."""
    kw = _ok()
    empty = run_native({**kw, **{k: kw[k][:0] for k in ("rows", "temperature", "seed", "step", "position")}})
    assert set(empty) == set(native.ROW_STATS_KEYS) and all(v.shape == (0,) for v in empty.values())
    wide = torch.randn(6, 1031)
    kw = make_inputs(6, 1000, seed=37, raw_fraction=0.5)
    kw["logits"] = wide[:, 13:1013]
    assert kw["logits"].stride() == (1031, 1)
    assert_matches_reference(run_native(kw), kw)


def test_binding_guards(module):
    """The binding refuses what would crash the process; an out-of-range row index (which the Python launcher
    rejects on CPU) gives an invalid row instead of an out-of-bounds read."""
    kw = _ok()
    kw["rows"] = torch.tensor([0, 7, -2])
    got = cpu_call(module, kw, 256)
    assert got["invalid"].tolist() == [0, 1, 1] and got["token"][1:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="dtype must be 0"):
        module.row_stats_cpu(0, 3, 1, 5, 5, *([0] * 15))
    with pytest.raises(ValueError, match="a data pointer is null"):
        module.row_stats_cpu(0, 0, 1, 5, 5, 0, 2, *([0] * 13))
    with pytest.raises(ValueError, match="K must be in"):
        module.row_stats_cpu(0, 0, 1, 5, 5, 0, 0, 0, 0, 0, 0, 0, 0, 5, *([0] * 6))


def test_module_functions(module):
    for name in ("row_stats_cpu", "row_stats_cuda"):
        assert callable(getattr(module, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_call_without_device_raises(module):
    kw = _ok()
    with pytest.raises(RuntimeError, match="no CUDA device/driver is available"):
        module.row_stats_cuda(*binding_args(kw, empty_outputs(3)), 0)


# ------------------------------------------------------------------------------------------------------- GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [126464, 152064])
@pytest.mark.parametrize("num_rows", [1, 32, 1024])
def test_cuda_matches_reference(module, num_rows, vocab, dtype):
    """Full vocabularies against the fp64 reference on the device: mixed temperatures, raw-confidence rows with
    excluded columns, rows selected out of order with repeats."""
    kw = make_inputs(num_rows, vocab, seed=num_rows + vocab, dtype=dtype, raw_fraction=0.3, device="cuda")
    g = torch.Generator().manual_seed(num_rows)
    kw["rows"] = torch.randint(0, num_rows, (num_rows,), generator=g).cuda()
    kw["conf_exclude"] = torch.randint(-vocab, vocab, (num_rows, 4), generator=g).cuda()
    got = run_native(kw)
    torch.cuda.synchronize()
    assert_matches_reference(got, kw, max_near_ties=max(1, num_rows // 200))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 2, 7, 1000, 4097])
def test_cuda_odd_shapes_and_edges(module, vocab, dtype):
    """Vocabularies that leave scalar heads and tails around the 16-byte vectors (rows offset by one element), fp16,
    invalid rows, and the out-of-range guard; tokens also equal to the C++ twin's."""
    kw = make_inputs(40, vocab, seed=vocab, dtype=dtype, raw_fraction=0.3)
    buf = (torch.randn(40 * vocab + 1) * 3).to(dtype)
    buf[1 + 3 * vocab + vocab - 1] = float("nan")
    buf[1 + 4 * vocab: 1 + 5 * vocab] = float("-inf")
    buf[1 + 5 * vocab] = float("inf")
    kw["logits"] = buf[1:].view(40, vocab)
    cuda_kw = {k: v.cuda() for k, v in kw.items()}
    cuda_kw["logits"] = buf.cuda()[1:].view(40, vocab)  # rows start 1 element past a 16-byte boundary
    got = run_native(cuda_kw)
    assert_matches_reference(got, kw)
    twin = run_native(kw)
    assert torch.equal(got["invalid"].cpu(), twin["invalid"])
    assert int((got["token"].cpu() != twin["token"]).sum()) <= 1
    cuda_kw["rows"] = torch.tensor([0, 40, -1], device="cuda")
    cuda_kw.update({k: cuda_kw[k][:3].contiguous() for k in ("temperature", "seed", "step", "position",
                                                               "raw_confidence")})
    guarded = run_native(cuda_kw)
    assert guarded["invalid"].tolist() == [0, 1, 1]


@gpu
@needs_cuda
def test_cuda_deterministic_side_stream(module):
    kw = make_inputs(256, 126464, seed=41, dtype=torch.bfloat16, raw_fraction=0.3, device="cuda")
    first = run_native(kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        again = run_native(kw)
    side.synchronize()
    for k, v in first.items():
        assert torch.equal(v.view(torch.int32) if v.is_floating_point() else v,
                           again[k].view(torch.int32) if v.is_floating_point() else again[k]), k


@gpu
@needs_cuda
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_cuda_sampler_chi_square(module, temperature):
    from scipy.stats import chisquare

    draws = 100_000
    logits = torch.tensor([[1.0, -0.5, 0.25, 2.0, -3.0, 0.9]], device="cuda")
    got = native.row_stats(logits, torch.zeros(draws, dtype=torch.int64, device="cuda"),
                           torch.full((draws,), temperature, device="cuda"),
                           torch.full((draws,), 99, dtype=torch.int64, device="cuda"),
                           torch.arange(draws, device="cuda"), torch.full((draws,), 5, dtype=torch.int64,
                                                                          device="cuda"))
    counts = torch.bincount(got["token"].cpu(), minlength=6).double()
    probs = torch.softmax(logits[0].double().cpu() / temperature, dim=0)
    assert chisquare(counts.numpy(), (probs * draws).numpy()).pvalue > 1e-4
