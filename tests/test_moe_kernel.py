"""The routed experts of a MoE feed-forward (``ops.moe_experts``): the torch path and the Triton kernel
(kernels/moe.py; on the CPU under the Triton interpreter, small shapes) against ``moe_experts_reference`` in fp64.

Tolerance (the project's rule): a path's largest error against fp64 is at most twice that of plain torch in the same
dtype (the reference's per-token formula run in that dtype), plus a floor of 16 ulps of the accumulation dtype
relative to the output's scale (plain torch's matrix-vector products and the paths' GEMMs sum the d products in
different orders). Batch invariance is exact: a token's output has the same bits alone and inside any batch.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import

from diffuse_engine import ops  # noqa: E402
from diffuse_engine.kernels import moe_torch  # noqa: E402
from diffuse_engine.kernels.reference import moe_experts_reference  # noqa: E402
from diffuse_engine.ops import backend as ops_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(n, d, i, e, k, dtype, seed=0, *, repeats=False, used=None, device=DEVICE, weight_dtype=F32):
    """x ``[n, d]`` and expert weights scaled so that every intermediate is O(1); each token routed to k distinct
    experts among the first ``used`` (default all E), or k ids drawn with repetition when ``repeats``; routing
    weights a softmax over the k slots (as a router's normalised top-k)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w_gate, w_up = (torch.randn(e, i, d, generator=gen) / d ** 0.5 for _ in range(2))
    w_down = torch.randn(e, d, i, generator=gen) / i ** 0.5
    used = used or e
    if repeats:
        ids = torch.randint(0, used, (n, k), generator=gen)
    else:
        ids = torch.rand(n, used, generator=gen).topk(k, dim=1).indices
    weights = torch.softmax(torch.randn(n, k, generator=gen), dim=1)
    return (*(t.to(device, dtype) for t in (x, w_gate, w_up, w_down)), ids.to(device), weights.to(device, weight_dtype))


def check(out, case):
    """``out`` against the fp64 reference under the 2x-plain-torch rule; a failure names the worst element."""
    x = case[0]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    want = moe_experts_reference(*case)
    plain = moe_experts_reference(*case, dtype=x.dtype)
    err = (out.double() - want).abs()
    plain_err = (plain.double() - want).abs().max().item()
    eps = torch.finfo(F64 if x.dtype == F64 else F32).eps
    bound = 2 * plain_err + 16 * eps * (1 + want.abs().max().item())
    if not err.max().item() <= bound:
        at = divmod(int(err.argmax()), x.shape[1])
        raise AssertionError(f"{x.dtype}: error {err.max().item():.3g} at (token, column) {at} (got "
                             f"{out[at].item():.6g}, fp64 {want[at].item():.6g}) > bound {bound:.3g} = 2 x plain "
                             f"torch's {plain_err:.3g} + 16 ulp floor")


SHAPES = [(1, 16, 16, 4, 1), (19, 48, 40, 6, 3), (33, 64, 96, 8, 2), (7, 24, 17, 5, 4)]  # N, d, I, E, k


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("shape", SHAPES, ids=["N{}-d{}-I{}-E{}-k{}".format(*s) for s in SHAPES])
def test_matches_reference(shape, dtype, backend):
    case = make_case(*shape, dtype, seed=sum(shape))
    check(ops.moe_experts(*case, backend=backend), case)


def test_fp64_torch_path():
    case = make_case(9, 32, 24, 4, 2, F64, seed=1)
    check(ops.moe_experts(*case), case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_routings(backend):
    """k = 1; the same expert twice in a row (both slots count); experts that get no token; one token; int32 ids and
    bf16 routing weights; a strided x."""
    cases = [make_case(12, 32, 16, 4, 1, F32, seed=2),
             make_case(10, 32, 16, 4, 3, F32, seed=3, repeats=True),
             make_case(15, 32, 16, 8, 2, F32, seed=4, used=3),
             make_case(1, 32, 16, 6, 2, F32, seed=5),
             make_case(6, 32, 16, 4, 2, F16, seed=6, weight_dtype=BF16)]
    ids = cases[1][4]
    ids[0] = torch.tensor([2, 2, 1])  # a guaranteed repeat
    x, *rest = make_case(8, 32, 16, 4, 2, F32, seed=7)
    cases.append((torch.cat([x, x], dim=1)[:, ::2], *rest))  # stride 2 along d
    cases.append((*cases[0][:4], cases[0][4].int(), cases[0][5]))
    for case in cases:
        check(ops.moe_experts(*case, backend=backend), case)
    zero = cases[2]  # experts 3..7 idle: their weights may be anything
    poisoned = (zero[0], zero[1].clone(), *zero[2:])
    poisoned[1][3:] = float("nan")
    assert torch.equal(ops.moe_experts(*poisoned, backend=backend), ops.moe_experts(*zero, backend=backend))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_batch_invariance(dtype):
    """A token's output is bit-identical alone, in a batch of 37 at any position, and next to other batches."""
    x, w_gate, w_up, w_down, ids, weights = make_case(37, 64, 48, 8, 2, dtype, seed=8)
    full = ops.moe_experts(x, w_gate, w_up, w_down, ids, weights, backend="torch")
    for t in (0, 5, 36):
        alone = ops.moe_experts(x[t:t + 1], w_gate, w_up, w_down, ids[t:t + 1], weights[t:t + 1], backend="torch")
        assert torch.equal(alone[0], full[t]), f"token {t}: {(alone[0] - full[t]).abs().max().item():.3g}"
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0)).to(ids.device)
    shuffled = ops.moe_experts(x[perm], w_gate, w_up, w_down, ids[perm], weights[perm], backend="torch")
    assert torch.equal(shuffled, full[perm])
    part = ops.moe_experts(x[:20], w_gate, w_up, w_down, ids[:20], weights[:20], backend="torch")
    assert torch.equal(part, full[:20])


def test_triton_batch_invariance():
    """The kernel's tiles do not depend on N: the same token alone and in a batch gives the same bits."""
    x, w_gate, w_up, w_down, ids, weights = make_case(21, 32, 32, 4, 2, F32, seed=9)
    full = ops.moe_experts(x, w_gate, w_up, w_down, ids, weights, backend="triton")
    alone = ops.moe_experts(x[7:8], w_gate, w_up, w_down, ids[7:8], weights[7:8], backend="triton")
    assert torch.equal(alone[0], full[7])


def test_cpu_default_is_the_torch_path():
    case = make_case(9, 32, 16, 4, 2, F32, seed=10, device="cpu")
    assert torch.equal(ops.moe_experts(*case), ops.moe_experts(*case, backend="torch"))


def _bad(case, **change):
    names = ("x", "w_gate", "w_up", "w_down", "topk_ids", "topk_weights")
    args = dict(zip(names, case, strict=True))
    args.update(change)
    return args


def test_bad_inputs_raise_sentences():
    case = make_case(4, 16, 8, 3, 2, F32, seed=11, device="cpu")
    x, w_gate, w_up, w_down, ids, weights = case
    bad = {
        "expert ids in \\[0, 3\\).*from 0 to 3": _bad(case, topk_ids=torch.tensor([[0, 3]] * 4)),
        "expert ids in \\[0, 3\\).*from -1": _bad(case, topk_ids=torch.tensor([[0, -1]] * 4)),
        "w_up must have shape \\(3, 8, 16\\)": _bad(case, w_up=w_up[:2]),
        "w_down must have shape \\(3, 16, 8\\)": _bad(case, w_down=w_down[:, :, :7]),
        "w_gate must be \\[E, I, d\\] with d = 12": _bad(case, x=x[:, :12]),
        "x must be 2-D": _bad(case, x=x[None]),
        "must share one dtype": _bad(case, w_down=w_down.double()),
        "topk_ids must be int32 or int64": _bad(case, topk_ids=ids.float()),
        "topk_ids must have 4 entries": _bad(case, topk_ids=ids[:3]),
        "topk_weights must have shape \\(4, 2\\)": _bad(case, topk_weights=weights[:, :1]),
        "at least one expert": _bad(case, topk_ids=ids[:, :0], topk_weights=weights[:, :0]),
    }
    for pattern, args in bad.items():
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=pattern) as info:
                ops.moe_experts(**args, backend=backend)
            assert str(info.value).endswith("."), str(info.value)
    with pytest.raises(ValueError, match="backend must be one of torch, triton"):
        ops.moe_experts(*case, backend="cuda")
    empty = ops.moe_experts(x[:0], w_gate, w_up, w_down, ids[:0], weights[:0])
    assert empty.shape == (0, 16) and empty.dtype == F32


def test_explicit_triton_that_cannot_run_raises(backend_env):
    case = make_case(4, 16, 8, 3, 2, F64, seed=12, device="cpu")
    with pytest.raises(ops.BackendUnavailableError, match="float32, float16 or bfloat16 tensors, not float64"):
        ops.moe_experts(*case, backend="triton")
    backend_env("TRITON_INTERPRET", None)
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.moe_experts(*(t.float() if t.is_floating_point() else t for t in case), backend="triton")
    backend_env("DIFFUSE_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="op 'moe_experts' has no cuda implementation"):
        ops.moe_experts(*case)


def test_automatic_choice_falls_back_with_one_warning(monkeypatch):
    """A kernel that fails under automatic choice warns once, is avoided afterwards, and the torch result comes
    back; the same failure under an explicit choice raises."""
    from diffuse_engine.kernels import moe as kernel_module
    from diffuse_engine.ops import moe as moe_op

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(kernel_module, "moe_experts", broken)
    monkeypatch.setattr(moe_op, "kernel_backend", lambda op, device_type: "triton")
    monkeypatch.setattr(ops_backend, "_FAILURES", {})
    case = make_case(5, 16, 8, 3, 2, F32, seed=13, device="cpu")
    want = ops.moe_experts(*case, backend="torch")
    with pytest.warns(RuntimeWarning, match="Triton MoE kernel failed .*no kernel image"):
        assert torch.equal(ops.moe_experts(*case), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ops.moe_experts(*case), want)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="no kernel image"):
        ops.moe_experts(*case, backend="triton")


def test_grouped_mm_and_loop_baseline_match_reference():
    """The per-expert masked loop (benchmark baseline) and the ``torch._grouped_mm`` form (where torch has it)."""
    case = make_case(17, 32, 24, 6, 2, F32, seed=14, device="cpu")
    check(moe_torch.moe_experts_loop(*case), case)
    if hasattr(torch, "_grouped_mm"):
        check(moe_torch.moe_experts_grouped(*case, grouped_mm=True), case)


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [32, 1024])
def test_llada2_mini_shape_on_gpu(n):
    """LLaDA2.0-mini's experts (d 2048, I 512, 256 experts, top-8) in bf16: Triton and torch (``_grouped_mm`` where
    it applies) within the rule; Triton batch-invariant."""
    case = make_case(n, 2048, 512, 256, 8, BF16, seed=n)
    for backend in ("triton", "torch"):
        check(ops.moe_experts(*case, backend=backend), case)
    if moe_torch.grouped_mm_applies(case[0], case[1]):
        check(moe_torch.moe_experts_grouped(*case, grouped_mm=True), case)
    alone = ops.moe_experts(*(t[3:4] if j in (0, 4, 5) else t for j, t in enumerate(case)), backend="triton")
    assert torch.equal(alone[0], ops.moe_experts(*case, backend="triton")[3])
