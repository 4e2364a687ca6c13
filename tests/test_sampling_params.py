"""Invalid settings and requests fail early with a ValueError that names what is wrong, and a failing batch
leaves nothing queued."""

from __future__ import annotations

import functools

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

LLADA = from_name("llada-tiny").config
DREAM = from_name("dream-tiny").config


@pytest.mark.parametrize("kwargs,field", [
    (dict(gen_length=32, block_length=12), "block_length"),
    (dict(gen_length=32, block_length=0), "block_length"),
    (dict(gen_length=32, block_length=8, steps=6), "steps"),  # 4 blocks do not divide 6 steps
    (dict(gen_length=32, steps=33), "steps"),
    (dict(gen_length=32, steps=0), "steps"),
    (dict(gen_length=0), "gen_length"),
    (dict(gen_length=-4), "gen_length"),
    (dict(gen_length=16.0), "gen_length"),
    (dict(remasking="low-confidence"), "remasking"),
    (dict(remasking="top_k"), "remasking"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(seed=-1), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(alg_temp=0.5, remasking="random"), "alg_temp"),
    (dict(alg_temp=0.5, remasking="origin"), "alg_temp"),
    (dict(alg_temp=-1.0), "alg_temp"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1.0), "eps"),
    (dict(logits_eos_inf=1), "logits_eos_inf"),
    (dict(confidence_eos_eot_inf="yes"), "confidence_eos_eot_inf"),
    (dict(early_stop=None), "early_stop"),
])
def test_invalid_params_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(gen_length=32, block_length=8, steps=8),
    dict(gen_length=32, block_length=8, steps=32),
    dict(gen_length=32, steps=1),
    dict(top_p=1.0, top_k=1),
    dict(seed=0),
    dict(seed=2 ** 64 - 1),
    dict(alg_temp=0.0, remasking="random"),  # 0 means off, so it is allowed with any ordering
    dict(alg_temp=0.5, remasking="entropy"),
    dict(cfg_scale=0.0, temperature=0.0),
])
def test_valid_params(kwargs):
    SamplingParams(**kwargs)


def test_defaults():
    p = SamplingParams(gen_length=24)
    assert p.block_length == 24 and p.steps == 24 and p.num_blocks == 1
    assert p.resolved_remasking("llada") == "low_confidence"
    assert p.resolved_remasking("dream") == "maskgit_plus"


# ------------------------------------------------------------------------------------------- engine level
@functools.cache
def _llm(name: str) -> LLM:
    return LLM.from_model(build_model(from_name(name).config).init_random_(0))


@pytest.fixture(params=["llada-tiny", "dream-tiny"])
def llm(request):
    llm = _llm(request.param)
    assert not llm.engine.has_unfinished()
    yield llm
    assert not llm.engine.has_unfinished(), "a failing request stayed queued"


OK = SamplingParams(gen_length=8, steps=4, seed=1)


def _bad_prompts(cfg):
    return {
        "empty": ([], "empty"),
        "too_long": ([1] * (cfg.max_position_embeddings - 7), "max"),  # prompt + gen_length 8 = max + 1
        "mask_id": ([1, 2, cfg.mask_token_id, 3], "mask"),
        "above_vocab": ([1, cfg.vocab_size], "vocabulary"),
        "negative": ([-1, 5], "vocabulary"),
    }


@pytest.mark.parametrize("case", ["empty", "too_long", "mask_id", "above_vocab", "negative"])
def test_bad_prompt_is_rejected(llm, case):
    prompt, words = _bad_prompts(llm.config)[case]
    with pytest.raises(ValueError, match=words):
        llm.generate([prompt], OK)


def test_prompt_plus_gen_length_at_the_limit_runs(llm):
    limit = llm.config.max_position_embeddings
    out = llm.generate([[1] * (limit - 8)], OK)[0]
    assert len(out.token_ids) == 8
    with pytest.raises(ValueError, match="gen_length"):
        llm.generate([[1] * 10], SamplingParams(gen_length=limit - 9, block_length=limit - 9, steps=1))


@pytest.mark.parametrize("case", ["empty", "too_long", "mask_id", "above_vocab"])
def test_failing_batch_leaves_nothing_queued(llm, case):
    prompt, _ = _bad_prompts(llm.config)[case]
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 3], [4, 5], prompt, [6]], OK)
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_unfinished() == 0
    # the engine is still usable, and the good prompts decode as they would have
    outs = llm.generate([[1, 2, 3], [4, 5]], OK)
    assert outs[0].token_ids == llm.generate([[1, 2, 3]], OK)[0].token_ids


def test_wrong_number_of_params(llm):
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[1, 2], [3, 4], [5]], [OK, OK])
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[1, 2]], [OK, OK])
    assert not llm.engine.has_unfinished()


def test_no_prompts(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([], OK)


def test_non_integer_prompt(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.engine.add_request([1.0, 2.0], OK)
    with pytest.raises(ValueError, match="prompt|token"):
        llm.generate(["hello"], OK)  # a string needs a tokenizer, and this model has none
    assert not llm.engine.has_unfinished()


def test_params_must_be_sampling_params(llm):
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.engine.add_request([1, 2], {"gen_length": 8})


def test_single_prompt_and_tensor_prompts(llm):
    a = llm.generate([7, 8, 9], OK)[0].token_ids
    assert llm.generate([[7, 8, 9]], OK)[0].token_ids == a
    assert llm.generate(torch.tensor([[7, 8, 9]]), OK)[0].token_ids == a
