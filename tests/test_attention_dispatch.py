"""ops.attention: every backend computes the same attention (bidirectional, block-causal, padded and packed
batches) as an fp64 reference written here from the definition; explicit choices that cannot run raise with
the reason; a shipped model decodes the same tokens with the Triton kernel (CPU interpreter) as with SDPA."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from diffuse_engine import LLM, ops
from diffuse_engine.models.layers import TokenLayout
from diffuse_engine.quality.tasks import get_task

HAS_TRITON = importlib.util.find_spec("triton") is not None


def plain_attention(q, k, v, seqlens, block_size=None, key_valid=None):
    """fp64 attention per sequence, written from the definition (independent of kernels.reference)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    start = 0
    for n in seqlens:
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        ks, vs = ks.repeat_interleave(g, dim=1), vs.repeat_interleave(g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(q.shape[-1])
        visible = torch.ones(n, n, dtype=torch.bool)
        if block_size:
            blk = torch.arange(n) // block_size
            visible &= blk[:, None] >= blk[None, :]
        if key_valid is not None:
            visible &= key_valid[start:start + n][None, :]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[start:start + n] = torch.einsum("hqk,khd->qhd", probs, vs)
        start += n
    return out


def _inputs(n, h, kv, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, d, generator=gen) for heads in (h, kv, kv)]


@pytest.mark.parametrize("block_size", [None, 4, 7])
@pytest.mark.parametrize("h,kv", [(4, 4), (8, 2), (7, 1)])
def test_sdpa_paths_match_the_definition(block_size, h, kv):
    seqlens = [1, 19, 12]
    q, k, v = _inputs(sum(seqlens), h, kv, 16)
    got = ops.attention(q, k, v, TokenLayout.packed(seqlens), block_size=block_size, backend="sdpa")
    want = plain_attention(q, k, v, seqlens, block_size)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    # padded layout with a key mask (one row left-padded)
    b, s = 2, 12
    q, k, v = _inputs(b * s, h, kv, 16, seed=1)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :3] = False
    got = ops.attention(q, k, v, TokenLayout.padded(b, s, mask), block_size=block_size, backend="sdpa")
    want = plain_attention(q, k, v, [s] * b, block_size, mask.reshape(-1))
    rows = mask.reshape(-1) | (block_size is None)  # a row whose visible keys are all padding is undefined in SDPA
    if block_size:
        blk = torch.arange(s) // block_size
        seen = (blk[:, None] >= blk[None, :]) & mask[:, None, :]
        rows = seen.any(-1).reshape(-1)
    torch.testing.assert_close(got.double()[rows], want[rows], atol=2e-5, rtol=2e-5)


def test_explicit_choices_that_cannot_run_raise(backend_env):
    q, k, v = _inputs(5, 2, 2, 8)
    layout = TokenLayout.packed([5])
    backend_env("TRITON_INTERPRET", None)
    with pytest.raises(ops.BackendUnavailableError, match="'triton' cannot run here: .*TRITON_INTERPRET=1"):
        ops.attention(q, k, v, layout, backend="triton")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ops.BackendUnavailableError, match="flash_attn is not installed"):
            ops.attention(q, k, v, layout, backend="flash-attn")
    with pytest.raises(ValueError, match="not one of triton, sdpa, flash-attn, reference"):
        ops.attention(q, k, v, layout, backend="cudnn")
    backend_env("DIFFUSE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="'flash' is not one of"):
        ops.attention(q, k, v, layout)
    backend_env("DIFFUSE_ATTENTION_BACKEND", None)
    backend_env("DIFFUSE_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="op 'attention' has no cuda implementation"):
        ops.attention(q, k, v, layout)
    backend_env("DIFFUSE_BACKEND", "torch")
    assert ops.attention_backend(q, layout) == "sdpa"
    backend_env("DIFFUSE_BACKEND", None)
    assert ops.attention_backend(q, layout) == "sdpa"  # CPU tensors: SDPA unless asked otherwise


def test_reference_backend_matches_the_definition():
    seqlens = [3, 10]
    q, k, v = (t.double() for t in _inputs(13, 8, 2, 16))
    got = ops.attention(q, k, v, TokenLayout.packed(seqlens), block_size=4, backend="reference")
    torch.testing.assert_close(got, plain_attention(q, k, v, seqlens, 4), atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_end_to_end_matches_sdpa(backend_env):
    """A shipped model decodes 4 held-out sums with the Triton attention kernel under the CPU interpreter and
    with SDPA: same tokens, logits within fp32 rounding."""
    backend_env("TRITON_INTERPRET", "1")
    llm = LLM("addition", device="cpu")
    task = get_task("addition")
    prompts = [e.prompt for e in task.test_set(4)]
    backend_env("DIFFUSE_ATTENTION_BACKEND", "sdpa")
    want = llm.generate(prompts)
    ids = torch.tensor([llm.encode(p) for p in prompts])
    logits_sdpa = llm.model(ids)
    backend_env("DIFFUSE_ATTENTION_BACKEND", "triton")
    got = llm.generate(prompts)
    logits_triton = llm.model(ids)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(task.check(p, o.text) for p, o in zip(prompts, got, strict=True))
    torch.testing.assert_close(logits_triton, logits_sdpa, atol=1e-4, rtol=1e-4)


def test_attention_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    """The benchmark script itself (torch providers on small CPU shapes): rows with achieved rates and a
    ratio against SDPA."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "attention.csv"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_attention.py"), "--quick", "--device",
                           "cpu", "--csv", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert {"full", "block_over_cache"} <= {r["op"] for r in rows} <= {"full", "block_causal", "block_over_cache"}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["pct_floor"]) > 0 and r["device"].startswith("cpu")
        assert float(r["tflops"] or r["gbps"]) > 0
    assert all(float(r["ratio_vs_sdpa"]) == 1.0 for r in rows if r["provider"] == "sdpa")
    assert all(r["correct"] == "True" for r in rows)


def test_automatic_choice_falls_back_to_sdpa_when_the_kernel_fails(monkeypatch):
    """Automatic choice on CUDA picks Triton for packed batches; if the kernel cannot compile or launch (an
    older Triton), the call is answered by SDPA with a warning and later calls skip Triton. An explicit
    choice raises instead."""
    import diffuse_engine.kernels.attention as kernel
    from diffuse_engine.ops import backend

    dispatch = importlib.import_module("diffuse_engine.ops.attention")  # ops.attention is the function
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no such intrinsic")

    monkeypatch.setattr(kernel, "attention", broken)
    monkeypatch.setattr(backend, "_FAILURES", {})
    monkeypatch.setattr(dispatch, "attention_backend", lambda q, layout, block_size=None, requested=None:
                        requested or ("sdpa" if backend.failure("attention") else "triton"))
    seqlens = [3, 5]
    q, k, v = _inputs(8, 4, 2, 8)
    with pytest.warns(RuntimeWarning, match="no such intrinsic"):
        got = ops.attention(q, k, v, TokenLayout.packed(seqlens))
    torch.testing.assert_close(got.double(), plain_attention(q, k, v, seqlens), atol=2e-5, rtol=2e-5)
    ops.attention(q, k, v, TokenLayout.packed(seqlens))
    assert len(calls) == 1 and "no such intrinsic" in backend.failure("attention")
    with pytest.raises(RuntimeError, match="no such intrinsic"):
        ops.attention(q, k, v, TokenLayout.packed(seqlens), backend="triton")


@pytest.mark.parametrize("write_cache", [False, True])
def test_block_attention_cached_backends_agree(backend_env, write_cache):
    """ops.block_attention_cached: SDPA and Triton (CPU interpreter) paths against the fp64 reference, with the
    cache written in place by each."""
    from diffuse_engine.kernels.reference import block_attention_cached_reference

    backend_env("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(3)
    b, L, h, kv, d, page = 2, 5, 4, 2, 16, 8
    q, k_new, v_new = (torch.randn(b, L, n, d, generator=gen) for n in (h, kv, kv))
    k_cache, v_cache = (torch.randn(8, page, kv, d, generator=gen) for _ in range(2))
    block_table = torch.tensor([[3, 0, 5, 1], [2, 7, 4, 6]], dtype=torch.int32)
    cache_lens = torch.tensor([20, 9], dtype=torch.int32)  # request 0 has a suffix, request 1 a prefix only
    block_start = torch.tensor([6, 9], dtype=torch.int32)
    ang = torch.rand(b, L, d // 2, generator=gen) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    args64 = [t.double() if t.is_floating_point() else t for t in
              (q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos, sin)]
    want, k_want, v_want = block_attention_cached_reference(*args64, write_cache=write_cache)
    for backend in ("sdpa", "triton", "reference"):
        kc, vc = k_cache.clone(), v_cache.clone()
        got = ops.block_attention_cached(q, k_new, v_new, kc, vc, block_table, cache_lens, block_start, cos, sin,
                                         write_cache=write_cache, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=backend)
        torch.testing.assert_close(kc.double(), k_want, atol=1e-6, rtol=1e-6, msg=backend)
        torch.testing.assert_close(vc.double(), v_want, atol=0, rtol=0, msg=backend)
    with pytest.raises(ops.BackendUnavailableError, match="flash-attn"):
        ops.block_attention_cached(q, k_new, v_new, k_cache, v_cache, block_table, cache_lens, block_start, cos,
                                   sin, backend="flash-attn")
