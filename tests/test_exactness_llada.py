"""The engine decodes LLaDA exactly as ML-GSAI/LLaDA's ``generate()`` (``oracles.llada_generate``).

Models are random tiny LLaDA checkpoints in float64, so that argmax and top-k decisions are not decided by
rounding: the engine (packed batches, LM head on candidate rows only) and the oracle (plain full forward)
compute the same logits up to ~1e-15, far below any gap between the values they rank. Sampled runs use
the same counter-based noise on both sides (``KeyedNoise(seed)`` = the engine's ``SamplingParams(seed=...)``).
A batch is checked against each prompt run alone through the oracle (the engine gives every request its own
positions; see DESIGN.md section 4).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from exactness import Family
from oracles import KeyedNoise, llada_generate

from diffuse_engine import SamplingParams

MODEL_SEEDS = (0, 1)
SHAPES = [  # (gen_length, block_length, steps)
    (32, 32, 32),  # one token per step, one block
    (32, 8, 16),  # several blocks, two tokens per step
    (32, 8, 32),  # several blocks, one token per step (steps == gen_length)
    (48, 16, 12),  # steps per block (4) divides block_length
    (64, 16, 8),  # 8 tokens per step
    (24, 8, 6),  # 2 steps per block for 8 tokens
    (30, 10, 9),  # 3 steps for 10 tokens per block: counts 4, 3, 3 (remainder in the first step)
    (28, 14, 8),  # 4 steps for 14 tokens: counts 4, 4, 3, 3 (remainder in the first steps)
    (16, 16, 1),  # everything in one step
]


def _llada(model, prompt: list[int], p: SamplingParams, seed: int, config) -> list[int]:
    out = llada_generate(
        model, torch.tensor([prompt]), steps=p.steps, gen_length=p.gen_length, block_length=p.block_length,
        temperature=p.temperature, cfg_scale=p.cfg_scale, remasking=p.remasking or "low_confidence",
        mask_id=config.mask_token_id, logits_eos_inf=p.logits_eos_inf,
        confidence_eos_eot_inf=p.confidence_eos_eot_inf, eos_id=config.eos_token_id, eot_id=config.eot_token_id,
        noise=KeyedNoise(seed))
    return out[0, len(prompt):].tolist()


LLADA = Family("llada-tiny", "LLaDA generate()", _llada, prompt_seed=1000, prompt_length=6,
               batch_lengths=(1, 4, 9, 15, 23))
CONFIG, PROMPT, BATCH_PROMPTS = LLADA.config, LLADA.prompt, LLADA.batch_prompts
EOS, EOT = CONFIG.eos_token_id, CONFIG.eot_token_id
_model, _llm, _oracle, _check = LLADA.model, LLADA.llm, LLADA.oracle, LLADA.check


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "g{}-b{}-s{}".format(*s))
def test_greedy_low_confidence(model_seed, shape):
    g, b, s = shape
    _check(model_seed, SamplingParams(gen_length=g, block_length=b, steps=s, seed=5))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 16, 12), (30, 10, 9)], ids=lambda s: "g{}-b{}-s{}".format(*s))
def test_sampled_low_confidence(model_seed, temperature, shape):
    g, b, s = shape
    _check(model_seed, SamplingParams(gen_length=g, block_length=b, steps=s, temperature=temperature,
                                      seed=123 + model_seed))


def test_sampled_temperature_not_exact_in_fp32():
    # 0.7 is not a float32 value; the oracle divides by the float64 0.7.
    _check(0, SamplingParams(gen_length=32, block_length=8, steps=16, temperature=0.7, seed=77))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("temperature", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 16, 12), (24, 8, 6)], ids=lambda s: "g{}-b{}-s{}".format(*s))
def test_random_remasking(model_seed, temperature, shape):
    g, b, s = shape
    _check(model_seed, SamplingParams(gen_length=g, block_length=b, steps=s, temperature=temperature,
                                      remasking="random", seed=2024))


def test_seed_changes_sampled_output():
    p = dict(gen_length=32, block_length=8, steps=16, temperature=1.0)
    a = _check(0, SamplingParams(**p, seed=1))
    b = _check(0, SamplingParams(**p, seed=2))
    assert a != b


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("cfg_scale", [0.5, 2.0])
@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_cfg(model_seed, cfg_scale, temperature):
    _check(model_seed, SamplingParams(gen_length=32, block_length=16, steps=16, cfg_scale=cfg_scale,
                                      temperature=temperature, seed=9))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_logits_eos_inf(model_seed, temperature):
    params = SamplingParams(gen_length=32, block_length=8, steps=16, temperature=temperature,
                            logits_eos_inf=True, seed=4)
    tokens = _check(model_seed, params, heavy=(EOS,))
    assert EOS not in tokens
    # and without the option this model does predict EOS, so the option is exercised
    free = _llm(model_seed, heavy=(EOS,)).generate([PROMPT], SamplingParams(
        gen_length=32, block_length=8, steps=16, temperature=temperature, seed=4))[0].token_ids
    assert EOS in free


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("temperature", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 8, 6)], ids=lambda s: "g{}-b{}-s{}".format(*s))
def test_confidence_eos_eot_inf_predicting_eot(model_seed, temperature, shape):
    """With a model that predicts end-of-turn often: those predictions get confidence 0 and are committed last
    (several at once tie at 0: the oracle breaks ties by position)."""
    g, b, s = shape
    params = SamplingParams(gen_length=g, block_length=b, steps=s, temperature=temperature, seed=31)
    free = _llm(model_seed, heavy=(EOT,)).generate([PROMPT], params)[0].token_ids
    assert EOT in free  # the model does predict EOT, so the option is exercised
    _check(model_seed, dataclasses.replace(params, confidence_eos_eot_inf=True), heavy=(EOT,))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("temperature", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(32, 32, 32), (32, 8, 16), (24, 8, 6)], ids=lambda s: "g{}-b{}-s{}".format(*s))
def test_confidence_eos_eot_inf_predicting_eos(model_seed, temperature, shape):
    """With a model that predicts EOS. In the published code, at temperature 0 ``add_gumbel_noise`` returns the
    logits tensor itself, so ``logits_with_noise[:, :, EOS] = logits[:, :, EOT] = -inf`` removes both EOS and
    EOT from the softmax that scores confidence (a predicted EOS gets confidence 0); at temperature > 0 only
    EOT is removed."""
    g, b, s = shape
    _check(model_seed, SamplingParams(gen_length=g, block_length=b, steps=s, temperature=temperature,
                                      confidence_eos_eot_inf=True, seed=31), heavy=(EOS,))


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_both_eos_options_with_cfg(temperature):
    _check(1, SamplingParams(gen_length=24, block_length=8, steps=12, temperature=temperature, cfg_scale=1.0,
                             logits_eos_inf=True, confidence_eos_eot_inf=True, seed=8), heavy=(EOS, EOT))


@pytest.mark.parametrize("model_seed", MODEL_SEEDS)
@pytest.mark.parametrize("setting", [
    dict(gen_length=32, block_length=8, steps=16),
    dict(gen_length=24, block_length=8, steps=6, temperature=0.5),
    dict(gen_length=24, block_length=24, steps=12, remasking="random", temperature=1.0),
    dict(gen_length=16, block_length=8, steps=8, cfg_scale=1.5, temperature=0.5),
], ids=["greedy", "sampled", "random", "cfg"])
def test_batch_of_five_equals_each_alone(model_seed, setting):
    LLADA.check_batch(model_seed, [SamplingParams(**setting, seed=100 + i) for i in range(len(BATCH_PROMPTS))])


def test_batch_with_mixed_settings():
    settings = [
        dict(gen_length=32, block_length=8, steps=16),
        dict(gen_length=24, block_length=8, steps=6, temperature=0.5),
        dict(gen_length=30, block_length=10, steps=9, remasking="random"),
        dict(gen_length=16, block_length=16, steps=16, cfg_scale=1.0),
        dict(gen_length=16, block_length=8, steps=8, confidence_eos_eot_inf=True, logits_eos_inf=True,
             temperature=1.0),
    ]
    LLADA.check_batch(0, [SamplingParams(**s, seed=50 + i) for i, s in enumerate(settings)], detail=False)


def test_nfe_is_steps():
    out = _llm(0).generate([PROMPT], SamplingParams(gen_length=48, block_length=16, steps=12, seed=1))[0]
    assert out.nfe == 12 and len(out.token_ids) == 48


# ------------------------------------------------------------------------------------------------ float32
FP32_SETTINGS = [
    dict(gen_length=32, block_length=32, steps=32),
    dict(gen_length=48, block_length=16, steps=12),
    dict(gen_length=24, block_length=8, steps=6),
]


def test_float32_model_matches_oracle_at_temperature_0():
    """A float32 model: the engine (fp32 softmax, packed forward) against the oracle on the same model (its
    logits from the plain forward, softmax in fp64). Decisions may legitimately differ at near-ties, so the
    comparison counts flipped tokens; on these models and settings none flip."""
    LLADA.float32_flips((model_seed, SamplingParams(**setting, seed=0), prompt, setting)
                        for model_seed in MODEL_SEEDS for setting in FP32_SETTINGS
                        for prompt in (PROMPT, BATCH_PROMPTS[2], BATCH_PROMPTS[4]))
