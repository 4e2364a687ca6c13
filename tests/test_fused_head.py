"""The engine's fused head (ops.lm_head_stats: LM head + sampling statistics in one op) gives the same tokens as
the unfused head (logits, then ops.sample_and_score), and steps it cannot serve fall back to the unfused head."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from diffuse_engine import LLM, SamplingParams, ops
from diffuse_engine.engine import EngineConfig
from diffuse_engine.loader import load_model
from diffuse_engine.quality.tasks import get_task

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _llm(name: str, fused: bool | None) -> LLM:
    model, _, tok = load_model(name)
    return LLM.from_model(model, tok, EngineConfig(fused_head=fused))


@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("topk_margin", 0.0),
                                                   ("low_confidence", 0.7), ("maskgit_plus", 1.0)])
def test_fused_head_matches_the_unfused_head(remasking, temperature):
    task = get_task("sudoku4x4")
    prompts = [e.prompt for e in task.test_set(12)]
    params = SamplingParams(gen_length=16, steps=8, temperature=temperature, remasking=remasking, seed=5)
    want = _llm("sudoku4x4", False).generate(prompts, params)
    got = _llm("sudoku4x4", True).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_fused_head_is_used_only_where_it_applies(monkeypatch):
    calls = []
    real = ops.lm_head_stats

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lm_head_stats", spy)
    prompt = get_task("sudoku4x4").test_set(1)[0].prompt
    llm = _llm("sudoku4x4", True)
    llm.generate(prompt, SamplingParams(gen_length=16, steps=4))
    assert len(calls) == 4
    for params in (SamplingParams(gen_length=16, steps=4, temperature=1.0, top_k=3),
                   SamplingParams(gen_length=16, steps=4, logits_eos_inf=True),
                   SamplingParams(gen_length=16, steps=4, cfg_scale=1.0)):
        calls.clear()
        llm.generate(prompt, params)
        assert calls == [], params
    calls.clear()
    _llm("sudoku4x4", None).generate(prompt, SamplingParams(gen_length=16, steps=4))
    assert calls == []  # automatic: CUDA only


def test_lm_head_stats_torch_path_matches_logits_then_reference():
    from diffuse_engine.kernels.reference import row_stats_reference

    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(9, 16, generator=gen), torch.randn(40, 16, generator=gen)
    rows = torch.tensor([8, 0, 3, 3])
    args = (torch.tensor([0.0, 1.0, 0.5, 0.0]), torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.arange(4))
    got = ops.lm_head_stats(hidden, weight, rows, *args)
    want = row_stats_reference((hidden[rows] @ weight.T), torch.arange(4), *args)
    assert torch.equal(got["token"], want["token"])
    torch.testing.assert_close(got["neg_entropy"], want["neg_entropy"])
    bad = hidden.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="row 2 has NaN"):
        ops.lm_head_stats(bad, weight, rows, *args)
    assert ops.lm_head_stats(bad, weight, rows, *args, check=False)["invalid"].tolist() == [0, 0, 1, 1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_fused_head_end_to_end(backend_env):
    """The Triton fused LM head (CPU interpreter) decodes held-out puzzles to the same tokens as the unfused
    torch head."""
    backend_env("TRITON_INTERPRET", "1")
    task = get_task("addition")
    prompts = [e.prompt for e in task.test_set(3)]
    params = SamplingParams(gen_length=6, steps=6, temperature=0.0)
    want = _llm("addition", False).generate(prompts, params)
    backend_env("DIFFUSE_BACKEND", "triton")
    backend_env("DIFFUSE_ATTENTION_BACKEND", "sdpa")
    got = _llm("addition", True).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_sample_and_score_uses_the_one_pass_kernel_when_forced(backend_env):
    """DIFFUSE_BACKEND=triton routes ops.sample_and_score through the Triton row_stats kernel (CPU interpreter):
    same tokens as the reference, exact entropy; filters it has no kernel for raise with the reason."""
    from diffuse_engine.kernels.reference import sample_and_score

    backend_env("TRITON_INTERPRET", "1")
    backend_env("DIFFUSE_BACKEND", "triton")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen) * 3
    args = (torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0]), torch.arange(6) * 977, torch.full((6,), 3), torch.arange(6))
    raw = torch.tensor([True, False, True, False, True, False])
    got = ops.sample_and_score(logits, *args, raw_confidence=raw)
    want = sample_and_score(logits.double(), *args, raw_confidence=raw, entropy_eps=0.0)
    assert torch.equal(got["token"], want["token"])
    torch.testing.assert_close(got["neg_entropy"].double(), want["neg_entropy"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ops.BackendUnavailableError, match="top-k / top-p"):
        ops.sample_and_score(logits, *args, top_k=torch.full((6,), 5))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_commit_dispatch_matches_the_reference(backend_env, backend):
    """ops.commit on each backend (Triton under the CPU interpreter) equals commit_reference: canvas, flags and
    counters, with every rule in one batch."""
    from diffuse_engine.kernels.reference import commit_reference

    backend_env("TRITON_INTERPRET", "1")
    backend_env("DIFFUSE_BACKEND", backend)
    gen = torch.Generator().manual_seed(4)
    sizes = [5, 0, 9, 7]
    offsets = torch.tensor([0, 5, 5, 14, 21])
    canvas = torch.full((40,), 99, dtype=torch.int64)
    row_index = torch.randperm(40, generator=gen)[:21]
    token = torch.randint(0, 50, (21,), generator=gen)
    score, entropy = torch.rand(21, generator=gen), torch.rand(21, generator=gen) * 2
    mode = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    count = torch.tensor([2, 1, 3, 1], dtype=torch.int32)
    threshold, factor, gamma = torch.tensor([0.0, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0]), \
        torch.tensor([0.0, 0.0, 0.0, 0.8])
    args = (row_index, token, score, entropy, mode, count, threshold, factor, gamma, 0)
    want_canvas = canvas.clone()
    want = commit_reference(ops.CommitBatch(want_canvas, offsets, *args))
    got = ops.commit(ops.CommitBatch(canvas, offsets, *args), max_rows=max(sizes))
    assert torch.equal(canvas, want_canvas) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_automatic_fused_head_falls_back_when_the_kernel_fails(monkeypatch):
    """With fused_head=None (automatic), a fused head that cannot compile or launch warns once and the engine
    continues with the unfused head (same tokens); fused_head=True raises the error instead."""
    from diffuse_engine.engine.runner import ModelRunner

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(ModelRunner, "fuse", lambda self: self.fused_head is not False)
    monkeypatch.setattr(ops, "lm_head_stats", broken)
    prompts = [e.prompt for e in get_task("sudoku4x4").test_set(3)]
    params = SamplingParams(gen_length=16, steps=8)
    want = _llm("sudoku4x4", False).generate(prompts, params)
    llm = _llm("sudoku4x4", None)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.runner.fused_head is False
    with pytest.raises(RuntimeError, match="no kernel image"):
        _llm("sudoku4x4", True).generate(prompts, params)
