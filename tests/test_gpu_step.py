"""The device-resident step on a CUDA device (marked ``gpu``; skipped without one; run by benchmarks/gpu/run.sh).

- whole generations run with ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call of torch in a
  step raises; the one planned wait for the step's copy back is exempt (``Engine._fetch``);
- CUDA graphs: replayed steps give the tokens of eager steps, and they were replayed;
- the engine's commit on the device equals the host reference on the same decisions (every policy in bf16).
"""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine import EngineConfig
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _llm(preset: str, dtype: torch.dtype, graphs: bool | None) -> LLM:
    model = build_model(from_name(preset).config, device="cuda", dtype=dtype).init_random_(0)
    return LLM.from_model(model, engine_config=EngineConfig(cuda_graphs=graphs))


def _prompts(n: int, length: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(10, 30000, (length + 3 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("kw", [dict(cache="dual", policy="threshold", threshold=0.5),
                                dict(cache="none", policy="fixed"),
                                dict(cache="prefix", policy="fixed", temperature=0.7, remasking="random")])
def test_generate_without_a_host_sync(kw, graphs):
    llm = _llm("llada-small", torch.bfloat16, graphs)
    params = SamplingParams(gen_length=64, block_length=32, steps=16, seed=0, **kw)
    llm.generate(_prompts(4), params)  # warm-up: Triton compiles, graphs are captured (capture may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = llm.generate(_prompts(4), params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(len(o.token_ids) == 64 for o in outs)
    if graphs and kw["cache"] == "dual":
        assert llm.engine.runner.graphs.replays > 0


@pytest.mark.parametrize("preset,kw", [("llada-small", dict(cache="dual", temperature=0.8)),
                                       ("llada-small", dict(cache="dual", remasking="random", temperature=0.5)),
                                       ("dream-small", dict(cache="dual", remasking="entropy")),
                                       ("sdar-tiny", dict(temperature=0.5))])
def test_graph_replay_equals_eager(preset, kw):
    """fp32, fixed schedules and a batch equal to its bucket (4) that steps in lockstep (no padding): the replayed
    graph runs the eager step's kernels (its head over every row of the block, the eager one over the candidates:
    each row's statistics are its own), so the tokens are identical."""
    cfg = from_name(preset).config
    block = cfg.block_size or 32
    params = SamplingParams(gen_length=2 * block, block_length=block, steps=block, seed=5, **kw)
    prompts = [list(range(100 + i, 100 + i + block)) for i in range(4)] if cfg.block_size else _prompts(4)
    eager = _llm(preset, torch.float32, False).generate(prompts, params)
    llm = _llm(preset, torch.float32, True)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    assert llm.engine.runner.graphs.replays > 0 and llm.engine.runner.graphs.captures > 0
