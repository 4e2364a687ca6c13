"""KV caches, parallel-decoding policies and the scheduler on a CUDA device (marked ``gpu``; skipped without one;
run by benchmarks/gpu/run.sh).

- fp64 on the GPU equals the CPU: the same weights decode the same tokens with every cache mode and policy
  (SDAR's exact block cache included), so the GPU paths of the paged pool, the KV plan and the commit op
  match the ones the CPU tests check against the oracles;
- a mixed batch on the GPU equals each request alone;
- bf16 LLaDA-shaped decoding with the dual cache and threshold runs, frees its pages, and the cost model has
  calibrated ceilings for the card.
"""

from __future__ import annotations

import pytest
import torch
from oracles_parallel import fastdllm_generate, sdar_generate

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SETTINGS = [
    dict(cache="prefix"),
    dict(cache="dual", policy="threshold", threshold=0.3),
    dict(policy="factor", factor=2.0, cache="dual", cache_refresh=2),
    dict(policy="eb", eb_gamma=0.5),
    dict(revision="remdm", remdm_variant="conf", remdm_eta=0.5, cache="prefix"),
    dict(policy="threshold", threshold=0.2, revision="wino", verify_threshold=0.6),
    dict(revision="edit", edit_margin=0.0, cache="dual", temperature=0.8),
]


def _pair(preset: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    cpu = build_model(from_name(preset).config, dtype=dtype).init_random_(seed).eval()
    gpu = build_model(from_name(preset).config, device="cuda", dtype=dtype)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.eval()


PROMPTS = [[5, 17, 99], list(range(30, 42)), [200] * 7]


@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
@pytest.mark.parametrize("kw", SETTINGS)
def test_gpu_equals_cpu_for_every_cache_and_policy(preset, kw):
    cpu, gpu = _pair(preset)
    params = SamplingParams(gen_length=16, block_length=8, steps=8, seed=3, **kw)
    want = [o.token_ids for o in LLM.from_model(cpu).generate(PROMPTS, params)]
    llm = LLM.from_model(gpu)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    assert llm.engine.kv_cache is None or llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


def test_gpu_threshold_equals_fastdllm():
    cpu, gpu = _pair("llada-tiny")
    params = SamplingParams(gen_length=16, block_length=8, policy="threshold", threshold=0.5, seed=0)
    for prompt, out in zip(PROMPTS, LLM.from_model(gpu).generate(PROMPTS, params), strict=True):
        want, nfe = fastdllm_generate(cpu, prompt, gen_length=16, block_length=8,
                                      mask_id=cpu.config.mask_token_id, threshold=0.5)
        assert (out.token_ids, out.nfe) == (want, nfe)


@pytest.mark.parametrize("steps_per_block", [4, 2])
def test_gpu_block_diffusion_equals_sdar_loop(steps_per_block):
    cpu, gpu = _pair("sdar-tiny")
    b = cpu.config.block_size
    params = SamplingParams(gen_length=16, block_length=b, steps=steps_per_block * 16 // b, seed=0)
    for prompt, out in zip(PROMPTS, LLM.from_model(gpu).generate(PROMPTS, params), strict=True):
        want, nfe = sdar_generate(cpu, prompt, gen_length=16, block_length=b, steps_per_block=steps_per_block,
                                  mask_id=cpu.config.mask_token_id)
        assert (out.token_ids, out.nfe) == (want, nfe)


def test_gpu_mixed_batch_equals_alone():
    _, gpu = _pair("dream-tiny")
    llm = LLM.from_model(gpu)
    params = [SamplingParams(gen_length=16, block_length=8, steps=8, seed=i, **kw) for i, kw in enumerate(SETTINGS)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output.token_ids
    assert [done[i] for i in ids] == alone


def test_gpu_bf16_dual_threshold_runs_and_calibrates():
    model = build_model(from_name("llada-small").config, device="cuda", dtype=torch.bfloat16)
    model.init_random_(0, on_device=True).eval()
    llm = LLM.from_model(model)
    ceilings = llm.engine.cost_model.ceilings
    assert ceilings.source != "preset" and ceilings.bandwidth_gbs > 500 and ceilings.peak_tflops > 50
    outs = llm.generate([list(range(40)), list(range(7, 40))],
                        SamplingParams(gen_length=64, block_length=32, cache="dual", policy="threshold", seed=0))
    assert all(len(o.token_ids) == 64 for o in outs)
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages
    assert llm.engine.last_estimate is not None
