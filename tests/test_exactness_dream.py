"""The engine decodes Dream exactly as Dream-org's ``diffusion_generate`` (``oracles.dream_generate``).

Random tiny Dream checkpoints in float64 (so that argmax / top-k decisions are not decided by rounding), one
block of ``gen_length`` (Dream's published algorithm has no blocks), shifted logits. Sampled runs share the
counter-based noise: token sampling (stream SAMPLE), ``origin``'s coins (TRANSFER) and ``alg_temp``'s
position sampling (ORDER) are keyed by the request seed, its forward index and the position.
"""

from __future__ import annotations

import pytest
import torch
from exactness import Family
from oracles import KeyedNoise, dream_generate

from diffuse_engine import SamplingParams

MODEL_SEEDS = (0, 1)
ORDERINGS = ("maskgit_plus", "topk_margin", "entropy")
SHAPES = [(32, 32), (32, 8), (24, 5), (40, 7), (16, 1)]  # (gen_length, steps)


def _dream(model, prompt: list[int], p: SamplingParams, seed: int, config) -> list[int]:
    assert p.block_length == p.gen_length
    out = dream_generate(model, torch.tensor([prompt]), p.gen_length, p.steps, eps=p.eps,
                         alg=p.remasking or "maskgit_plus", alg_temp=p.alg_temp, temperature=p.temperature,
                         top_p=p.top_p, top_k=p.top_k, mask_id=config.mask_token_id, noise=KeyedNoise(seed))
    return out[0, len(prompt):].tolist()


DREAM = Family("dream-tiny", "Dream diffusion_generate", _dream, prompt_seed=2000, prompt_length=7,
               batch_lengths=(1, 5, 11, 18, 26))
CONFIG, PROMPT, BATCH_PROMPTS = DREAM.config, DREAM.prompt, DREAM.batch_prompts
_model, _llm, _oracle, _check = DREAM.model, DREAM.llm, DREAM.oracle, DREAM.check


def _shape_id(s):
    return "g{}-s{}".format(*s)


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("alg", ORDERINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_greedy(model_seed, alg, shape):
    g, s = shape
    _check(model_seed, SamplingParams(gen_length=g, steps=s, remasking=alg, seed=3))


def test_default_ordering_is_maskgit_plus():
    a = _llm(0).generate([PROMPT], SamplingParams(gen_length=24, steps=8))[0].token_ids
    assert a == _oracle(_model(0), PROMPT, SamplingParams(gen_length=24, steps=8, remasking="maskgit_plus"), 0)


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("alg", ORDERINGS)
@pytest.mark.parametrize("filters", [
    dict(temperature=0.5),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.75, top_k=20),
    dict(temperature=1.5, top_p=0.95, top_k=50),
    dict(temperature=0.0, top_p=0.8, top_k=5),  # filters change the confidences even when greedy
], ids=["T0.5", "T1-p0.9", "T0.75-k20", "T1.5-p0.95-k50", "T0-p0.8-k5"])
def test_sampled_with_filters(model_seed, alg, filters):
    _check(model_seed, SamplingParams(gen_length=32, steps=16, remasking=alg, seed=40 + model_seed, **filters))


def test_temperature_not_exact_in_fp32():
    # 0.7 is not a float32 value; the oracle divides by the float64 0.7.
    _check(0, SamplingParams(gen_length=32, steps=16, temperature=0.7, top_p=0.9, seed=7))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("alg", ORDERINGS)
@pytest.mark.parametrize("alg_temp", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_alg_temp(model_seed, alg, alg_temp, temperature):
    _check(model_seed, SamplingParams(gen_length=24, steps=8, remasking=alg, alg_temp=alg_temp,
                                      temperature=temperature, seed=11))


def test_alg_temp_zero_is_greedy_ordering():
    a = _check(1, SamplingParams(gen_length=24, steps=8, alg_temp=0.0, seed=1))
    assert a == _check(1, SamplingParams(gen_length=24, steps=8, seed=1))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("filters", [dict(temperature=0.0), dict(temperature=0.5), dict(temperature=1.0, top_p=0.9),
                                     dict(temperature=0.75, top_k=10)], ids=["T0", "T0.5", "T1-p0.9", "T0.75-k10"])
@pytest.mark.parametrize("shape", [(32, 32), (24, 6), (40, 7)], ids=_shape_id)
def test_origin(model_seed, filters, shape):
    g, s = shape
    _check(model_seed, SamplingParams(gen_length=g, steps=s, remasking="origin", seed=17, **filters))


@pytest.mark.parametrize("eps", [1e-2, 0.25])
def test_eps(eps):
    _check(0, SamplingParams(gen_length=32, steps=10, eps=eps, seed=2))
    _check(0, SamplingParams(gen_length=32, steps=10, eps=eps, remasking="origin", seed=2))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("setting", [
    dict(gen_length=32, steps=16),
    dict(gen_length=24, steps=6, temperature=0.5, top_p=0.9, remasking="topk_margin"),
    dict(gen_length=24, steps=8, remasking="entropy", alg_temp=0.5, temperature=1.0),
    dict(gen_length=20, steps=5, remasking="origin", temperature=0.5),
], ids=["greedy", "margin-sampled", "entropy-alg_temp", "origin"])
def test_batch_of_five_equals_each_alone(model_seed, setting):
    DREAM.check_batch(model_seed, [SamplingParams(**setting, seed=300 + i) for i in range(len(BATCH_PROMPTS))])


def test_batch_with_mixed_settings():
    settings = [
        dict(gen_length=32, steps=16, remasking="maskgit_plus"),
        dict(gen_length=24, steps=6, remasking="topk_margin", temperature=0.5, top_k=30),
        dict(gen_length=28, steps=7, remasking="entropy", alg_temp=1.0),
        dict(gen_length=16, steps=16, remasking="origin", temperature=1.0, top_p=0.9),
        dict(gen_length=20, steps=4, remasking="maskgit_plus", temperature=0.75, eps=0.05),
    ]
    DREAM.check_batch(1, [SamplingParams(**s, seed=60 + i) for i, s in enumerate(settings)], detail=False)


def test_float32_model_matches_oracle_at_temperature_0():
    """A float32 model against the oracle on the same model; counts flipped tokens (near-ties may legitimately
    flip; on these models and settings none do)."""
    DREAM.float32_flips((model_seed, SamplingParams(gen_length=g, steps=s, remasking=alg, seed=0), prompt, (alg, g, s))
                        for model_seed in MODEL_SEEDS for alg in ORDERINGS for g, s in [(32, 32), (24, 6)]
                        for prompt in (PROMPT, BATCH_PROMPTS[3]))
