"""The engine and models on a CUDA device (marked ``gpu``; skipped without one; run by benchmarks/gpu/run.sh).

- fp64 on the GPU: token-for-token equal to the published algorithms (oracles run on the CPU with the same
  weights: fp64 logits of the two devices differ by ~1e-15, far below the gaps between ranked values);
- bf16 forward at a LLaDA-shaped size against an fp64 CPU forward of the same weights;
- the sampling head on bf16 logits at the full LLaDA vocabulary against the fp64 reference;
- every ordering runs in bf16 and a seed reproduces its tokens.
"""

from __future__ import annotations

import pytest
import torch
from oracles import KeyedNoise, dream_generate, llada_generate

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.kernels import reference as ref
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _pair(preset: str, seed: int, dtype: torch.dtype = torch.float64):
    cpu = build_model(from_name(preset).config, dtype=dtype).init_random_(seed)
    gpu = build_model(from_name(preset).config, device="cuda", dtype=dtype)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("shape", [(32, 32, 32), (32, 8, 16), (48, 16, 12), (30, 10, 9)])
@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (0.7, "low_confidence"),
                                                   (0.0, "random")])
def test_llada_on_gpu_matches_reference(shape, temperature, remasking):
    g, b, s = shape
    cpu, gpu = _pair("llada-tiny", 0)
    cfg = cpu.config
    prompts = [[5, 17, 99], list(range(30, 52)), [200] * 7]
    params = SamplingParams(gen_length=g, block_length=b, steps=s, temperature=temperature, remasking=remasking,
                            seed=123)
    outs = LLM.from_model(gpu).generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        want = llada_generate(cpu, torch.tensor([prompt]), steps=s, gen_length=g, block_length=b,
                              temperature=temperature, remasking=remasking, mask_id=cfg.mask_token_id,
                              noise=KeyedNoise(123))[0, len(prompt):].tolist()
        assert out.token_ids == want


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "origin"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_dream_on_gpu_matches_reference(alg, temperature):
    cpu, gpu = _pair("dream-tiny", 1)
    cfg = cpu.config
    prompt = [3, 44, 81, 120, 7]
    params = SamplingParams(gen_length=24, steps=12, temperature=temperature, remasking=alg, seed=9,
                            top_p=0.9 if temperature else None)
    got = LLM.from_model(gpu).generate([prompt], params)[0].token_ids
    want = dream_generate(cpu, torch.tensor([prompt]), 24, 12, alg=alg, temperature=temperature,
                          top_p=params.top_p, mask_id=cfg.mask_token_id, noise=KeyedNoise(9))[0, len(prompt):]
    assert got == want.tolist()


def _fp64_logits(model, ids: torch.Tensor) -> torch.Tensor:
    ref64 = build_model(model.config, dtype=torch.float64)
    ref64.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    return ref64(ids.cpu())


@pytest.mark.parametrize("preset", ["llada-small", "dream-small"])
def test_bf16_forward_against_fp64(preset):
    cpu32, gpu = _pair(preset, 0, torch.float32)
    gpu = gpu.to(torch.bfloat16)
    ids = torch.randint(0, 120000, (2, 160), generator=torch.Generator().manual_seed(0))
    want = _fp64_logits(cpu32, ids)
    got = gpu(ids.cuda()).double().cpu()
    plain = cpu32.to(torch.bfloat16)(ids).double()  # plain torch in the same dtype, on the CPU
    err, err_plain = (got - want).abs().max().item(), (plain - want).abs().max().item()
    scale = want.abs().max().item()
    # bf16 has 8 mantissa bits: a few 1e-2 relative error through 8 layers; compare with plain torch bf16.
    assert err <= max(2 * err_plain, 0.05 * scale), (err, err_plain, scale)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_head_bf16_full_vocab(temperature):
    m, v = 256, 126464
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(m, v, generator=gen) * 3).to(torch.bfloat16)
    keys = dict(seed=torch.full((m,), 77, dtype=torch.int64), step=torch.arange(m) % 5, position=torch.arange(m))
    t = torch.full((m,), temperature)
    want = ref.sample_and_score(logits.double(), t, **keys)
    got = ref.sample_and_score(logits.cuda(), t.cuda(), **{k: x.cuda() for k, x in keys.items()})
    agree = (got["token"].cpu() == want["token"]).float().mean().item()
    assert agree >= 0.99  # only near-ties (fp32 vs fp64 Gumbel arithmetic) may differ
    same = got["token"].cpu() == want["token"]
    torch.testing.assert_close(got["prob"].cpu().double()[same], want["prob"][same], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["neg_entropy"].cpu().double(), want["neg_entropy"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "maskgit_plus", "topk_margin", "entropy",
                                       "origin"])
def test_bf16_engine_every_ordering_reproducible(remasking):
    arch = "dream-small" if remasking in ("maskgit_plus", "topk_margin", "entropy", "origin") else "llada-small"
    model = build_model(from_name(arch).config, device="cuda", dtype=torch.bfloat16).init_random_(0)
    llm = LLM.from_model(model)
    params = SamplingParams(gen_length=64, block_length=32, steps=16, temperature=0.5, remasking=remasking, seed=4)
    prompts = [[11, 12, 13], list(range(500, 540))]
    a = llm.generate(prompts, params)
    b = llm.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert len(x.token_ids) == 64 and x.nfe == 16
        assert model.config.mask_token_id not in x.token_ids
