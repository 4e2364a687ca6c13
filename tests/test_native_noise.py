"""Native counter-based noise (csrc/noise.cu, csrc/noise_cpu.cpp) against kernels/reference.py.

Uniforms must be bit-identical to ``counter_uniform``; Gumbel noise within 1e-5 of ``counter_gumbel`` (logf and
torch's log may differ by an ulp). Tests that need the native module skip when it is not built, unless
``DIFFUSE_REQUIRE_NATIVE=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from diffuse_engine import native, ops
from diffuse_engine.kernels import reference as ref

GUMBEL_ATOL = 1e-5
STREAMS = (ref.STREAM_SAMPLE, ref.STREAM_REMASK, ref.STREAM_TRANSFER, ref.STREAM_ORDER)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_keys(rows: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row keys covering the edges: seeds >= 2**63 (negative int64), 0, -1 (2**64 - 1); step and position
    0 and 2**32 - 1."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g, dtype=torch.int64)
    st = torch.randint(0, 2**32, (rows,), generator=g, dtype=torch.int64)
    pos = torch.randint(0, 2**32, (rows,), generator=g, dtype=torch.int64)
    edges = torch.tensor([-(2**63), -1, 0, 2**63 - 1], dtype=torch.int64)
    k = min(rows, len(edges))
    s[:k] = edges[:k]
    st[: min(rows, 2)] = torch.tensor([2**32 - 1, 0])[: min(rows, 2)]
    pos[: min(rows, 2)] = torch.tensor([0, 2**32 - 1])[: min(rows, 2)]
    return s.to(device), st.to(device), pos.to(device)


def assert_bitexact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    diff = got.view(torch.int32) != want.view(torch.int32)
    if bool(diff.any()):
        idx = diff.nonzero()[0].tolist()
        raise AssertionError(f"{int(diff.sum())} of {diff.numel()} values differ; first at {idx}: got "
                             f"{got[tuple(idx)].item()!r}, want {want[tuple(idx)].item()!r}")


def assert_gumbel_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs()
    worst = int(err.argmax())
    assert float(err.max()) <= GUMBEL_ATOL, (f"max |diff| {float(err.max()):.3g} at flat index {worst}: got "
                                             f"{got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r}")


# ------------------------------------------------------------------------------------------------- C++ twin
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("cols", [1, 7, 320, 4097, 126464])
def test_cpu_twin_uniform_bitexact(module, rows, cols):
    seed, step, pos = make_keys(rows, seed=rows * 1000 + cols)
    for stream in (ref.STREAM_SAMPLE, ref.STREAM_ORDER):
        want = ref.counter_uniform(seed, step, pos, stream, cols)
        assert_bitexact(native.counter_noise(seed, step, pos, stream, cols), want)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (17, 4097), (5, 126464)])
def test_cpu_twin_gumbel_close(module, rows, cols):
    seed, step, pos = make_keys(rows, seed=7)
    want = ref.counter_gumbel(seed, step, pos, ref.STREAM_SAMPLE, cols)
    assert_gumbel_close(native.counter_noise(seed, step, pos, ref.STREAM_SAMPLE, cols, gumbel=True), want)


@pytest.mark.parametrize("stream", [*STREAMS, 0, 2**31, 2**32 - 1, -1, 2**40 + 3])
def test_cpu_twin_streams(module, stream):
    seed, step, pos = make_keys(9, seed=3)
    assert_bitexact(native.counter_noise(seed, step, pos, stream, 33), ref.counter_uniform(seed, step, pos, stream, 33))


def test_cpu_twin_writes_out(module):
    seed, step, pos = make_keys(4)
    out = torch.full((4, 50), float("nan"))
    got = native.counter_noise(seed, step, pos, ref.STREAM_SAMPLE, 50, out=out)
    assert got is out
    assert_bitexact(out, ref.counter_uniform(seed, step, pos, ref.STREAM_SAMPLE, 50))
    empty = torch.empty(0, dtype=torch.int64)
    assert native.counter_noise(empty, empty, empty, 1, 5).shape == (0, 5)


def test_uniform_statistics(module):
    """1e6 draws: mean ~ 0.5, chi-square over 64 equal bins, no correlation between neighbouring columns."""
    seed, step, pos = make_keys(1000, seed=11)
    u = native.counter_noise(seed, step, pos, ref.STREAM_SAMPLE, 1000).double()
    n = u.numel()
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = n / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120.0, f"chi-square {chi2:.1f} over 63 degrees of freedom (p < 1e-5 above 120)"
    corr = float(((u[:, 1:] - 0.5) * (u[:, :-1] - 0.5)).mean()) * 12
    assert abs(corr) < 5 / math.sqrt(n)


def test_gumbel_statistics(module):
    """Gumbel draws mapped through the exact fp64 CDF exp(-exp(-g)) must be uniform (chi-square, 64 bins), with the
    standard Gumbel mean (Euler's gamma)."""
    seed, step, pos = make_keys(500, seed=12)
    g = native.counter_noise(seed, step, pos, ref.STREAM_ORDER, 400, gumbel=True).double()
    n = g.numel()
    assert bool(torch.isfinite(g).all())
    assert abs(float(g.mean()) - 0.5772156649) < 5 * math.pi / math.sqrt(6 * n)
    counts = torch.histc(torch.exp(-torch.exp(-g)), bins=64, min=0.0, max=1.0)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 120.0, f"chi-square {chi2:.1f} over 63 degrees of freedom"


# ------------------------------------------------------------------------------------- launcher validation
def _ok_keys(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.zeros(rows, dtype=torch.int64) for _ in range(3))


@pytest.mark.parametrize("case,match", [
    ("seed_int32", "seed must be int64"),
    ("seed_2d", "seed must be 1-D"),
    ("step_length", r"step must have 3 entries \(rows, as seed\), got 2"),
    ("position_strided", "position must be contiguous"),
    ("step_device", "step is on meta but seed is on cpu"),
    ("all_meta", "runs on CPU or CUDA"),
    ("not_tensor", "seed must be a torch.Tensor"),
    ("num_cols_zero", "num_cols must be an int in"),
    ("num_cols_big", "num_cols must be an int in"),
    ("stream_float", "stream must be an int"),
    ("out_dtype", "out must be float32"),
    ("out_shape", r"out must have shape \(3, 5\)"),
    ("out_strided", "out must be contiguous"),
    ("out_device", "out is on meta"),
])
def test_launcher_validation(case, match):
    seed, step, pos = _ok_keys()
    kw: dict = {"stream": 1, "num_cols": 5}
    if case == "seed_int32":
        seed = seed.int()
    elif case == "seed_2d":
        seed = seed[:, None]
    elif case == "step_length":
        step = step[:2]
    elif case == "position_strided":
        pos = torch.zeros(6, dtype=torch.int64)[::2]
    elif case == "step_device":
        step = step.to("meta")
    elif case == "all_meta":
        seed, step, pos = (t.to("meta") for t in (seed, step, pos))
    elif case == "not_tensor":
        seed = [0, 0, 0]
    elif case == "num_cols_zero":
        kw["num_cols"] = 0
    elif case == "num_cols_big":
        kw["num_cols"] = 2**31
    elif case == "stream_float":
        kw["stream"] = 1.0
    elif case == "out_dtype":
        kw["out"] = torch.empty(3, 5, dtype=torch.float64)
    elif case == "out_shape":
        kw["out"] = torch.empty(5, 3)
    elif case == "out_strided":
        kw["out"] = torch.empty(5, 3).t()
    elif case == "out_device":
        kw["out"] = torch.empty(3, 5, device="meta")
    with pytest.raises(ValueError, match=match):
        native.counter_noise(seed, step, pos, **kw)


def test_launcher_without_module(monkeypatch, backend_env):
    monkeypatch.setattr(native, "native_status", lambda: (None, "not built: test"))
    with pytest.raises(ops.BackendUnavailableError, match="not built: test"):
        native.counter_noise(*_ok_keys(), 1, 5)
    backend_env(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ops.BackendUnavailableError):
        ops.counter_uniform(*_ok_keys(), 1, 5)


# ---------------------------------------------------------------------------------------------- ops dispatch
def test_ops_cpu_uses_reference_by_default(monkeypatch, backend_env):
    backend_env(ops.BACKEND_ENV, None)
    monkeypatch.setattr(native, "counter_noise", lambda *a, **k: pytest.fail("CPU tensors must use the reference"))
    seed, step, pos = make_keys(5)
    assert_bitexact(ops.counter_uniform(seed, step, pos, 2), ref.counter_uniform(seed, step, pos, 2))


def test_ops_forced_cuda_backend_on_cpu_uses_twin(module, backend_env):
    backend_env(ops.BACKEND_ENV, "cuda")
    seed, step, pos = make_keys(6, seed=5)
    assert_bitexact(ops.counter_uniform(seed, step, pos, 3), ref.counter_uniform(seed, step, pos, 3))
    assert_bitexact(ops.counter_uniform(seed, step, pos, 1, 99), ref.counter_uniform(seed, step, pos, 1, 99))
    assert_gumbel_close(ops.counter_gumbel(seed, step, pos, 4, 99), ref.counter_gumbel(seed, step, pos, 4, 99))
    # Broadcast per-row inputs of other shapes and dtypes, as the reference accepts them.
    grid_pos = torch.arange(12, dtype=torch.int32).view(2, 6)
    want = ref.counter_uniform(seed[:2, None], step[:2, None], grid_pos, 4)
    assert_bitexact(ops.counter_uniform(seed[:2, None], step[:2, None], grid_pos, 4), want)
    backend_env(ops.BACKEND_ENV, "triton")
    with pytest.raises(ops.BackendUnavailableError):
        ops.counter_uniform(seed, step, pos, 3)


# ---------------------------------------------------------------------------------------------- the build
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_call_without_device_raises(module):
    assert module.cuda_device_count() == 0
    seed, step, pos = _ok_keys()
    out = torch.empty(3, 5)
    with pytest.raises(RuntimeError, match="no CUDA device/driver is available"):
        module.counter_noise_cuda(out.data_ptr(), seed.data_ptr(), step.data_ptr(), pos.data_ptr(), 3, 5, 1, False, 0)


def test_module_compiled_for_target_archs(module):
    """Every ``sm_XX`` of DIFFUSE_CUDA_ARCHS (default sm_90a) has a cubin in the module: listed by cuobjdump when
    the toolkit has it, else found through the ptxas options note that each embedded cubin carries."""
    archs = os.environ.get("DIFFUSE_CUDA_ARCHS", "compute_90a,sm_90a")
    sms = [code for pair in archs.split(";") for code in pair.split(",")[1:] if code.startswith("sm_")]
    so = Path(module.__file__)
    cuobjdump = shutil.which("cuobjdump") or next(iter(glob.glob("/usr/local/cuda*/bin/cuobjdump")), None)
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True).stdout
        missing = [sm for sm in sms if f".{sm}." not in listing]
    else:
        data = so.read_bytes()
        missing = [sm for sm in sms if f"-arch {sm} ".encode() not in data]
    assert not missing, f"{so.name} has no cubin for {missing} (DIFFUSE_CUDA_ARCHS={archs})"


def test_module_functions(module):
    for name in ("counter_noise_cpu", "counter_noise_cuda", "cuda_device_count"):
        assert callable(getattr(module, name))


# ------------------------------------------------------------------------------------------------------- GPU
@gpu
@needs_cuda
@pytest.mark.parametrize("gumbel", [False, True])
def test_cuda_full_shape(module, gumbel):
    """M = 1024 rows of the LLaDA vocabulary against the torch reference on the same device, poisoned output."""
    rows, cols = 1024, 126464
    seed, step, pos = make_keys(rows, seed=21, device="cuda")
    out = torch.full((rows, cols), float("nan"), device="cuda")
    got = native.counter_noise(seed, step, pos, ref.STREAM_SAMPLE, cols, gumbel=gumbel, out=out)
    want = (ref.counter_gumbel if gumbel else ref.counter_uniform)(seed, step, pos, ref.STREAM_SAMPLE, cols)
    torch.cuda.synchronize()
    if gumbel:
        assert bool(torch.isfinite(got).all())
        assert_gumbel_close(got, want)
    else:
        assert_bitexact(got, want)


@gpu
@needs_cuda
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (17, 4097), (5, 126464), (300_001, 8)])
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_odd_shapes_match_cpu_reference(module, rows, cols, aligned):
    """Scalar (odd V or a 4-byte-offset out) and float4 paths, and more row groups than one grid row holds, against
    the CPU reference."""
    seed, step, pos = make_keys(rows, seed=rows + cols)
    buf = torch.full((rows * cols + 1,), float("nan"), device="cuda")
    out = (buf[:-1] if aligned else buf[1:]).view(rows, cols)
    got = native.counter_noise(seed.cuda(), step.cuda(), pos.cuda(), ref.STREAM_REMASK, cols, out=out)
    assert_bitexact(got.cpu(), ref.counter_uniform(seed, step, pos, ref.STREAM_REMASK, cols))


@gpu
@needs_cuda
def test_cuda_side_stream_and_ops_dispatch(module, backend_env):
    backend_env(ops.BACKEND_ENV, None)
    assert module.cuda_device_count() == torch.cuda.device_count()
    seed, step, pos = make_keys(64, seed=31, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = native.counter_noise(seed, step, pos, ref.STREAM_SAMPLE, 5000)
    side.synchronize()
    assert_bitexact(got, ref.counter_uniform(seed, step, pos, ref.STREAM_SAMPLE, 5000))
    assert_bitexact(ops.counter_uniform(seed, step, pos, 2), ref.counter_uniform(seed, step, pos, 2))
    assert_gumbel_close(ops.counter_gumbel(seed, step, pos, 1, 77), ref.counter_gumbel(seed, step, pos, 1, 77))
