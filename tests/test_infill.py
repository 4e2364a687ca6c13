"""Infilling: a canvas between a prompt and a fixed suffix (``Engine.add_request(suffix=...)``, ``LLM.infill``).

Exactness: random tiny float64 checkpoints against the published loops re-expressed with a fixed suffix appended
after the masked canvas (``oracles.llada_generate`` / ``dream_generate`` with ``suffix``: the suffix is observed
like the prompt, never a candidate). Caches: the suffix's K/V are written by a block's refresh step and read from
the cache by its later steps (``dual``), or recomputed with the block (``prefix``). Batches mixing infill and plain
requests decode each request as it decodes alone.
"""

from __future__ import annotations

import pytest
import torch
from exactness import Family, random_prompt
from oracles import KeyedNoise, dream_generate, llada_generate
from test_kv_cache import _full_kv

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine.recompute import recompute
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

SUFFIX = random_prompt(5, 77)


def _llada(model, prompt, p: SamplingParams, seed: int, config, suffix=None) -> list[int]:
    out = llada_generate(model, torch.tensor([prompt]), steps=p.steps, gen_length=p.gen_length,
                         block_length=p.block_length, temperature=p.temperature, cfg_scale=p.cfg_scale,
                         remasking=p.remasking or "low_confidence", mask_id=config.mask_token_id,
                         eos_id=config.eos_token_id, eot_id=config.eot_token_id, noise=KeyedNoise(seed),
                         suffix=suffix)
    return out[0, len(prompt):].tolist()


def _dream(model, prompt, p: SamplingParams, seed: int, config, suffix=None) -> list[int]:
    out = dream_generate(model, torch.tensor([prompt]), p.gen_length, p.steps, eps=p.eps,
                         alg=p.remasking or "maskgit_plus", alg_temp=p.alg_temp, temperature=p.temperature,
                         mask_id=config.mask_token_id, noise=KeyedNoise(seed), suffix=suffix)
    return out[0, len(prompt):].tolist()


LLADA = Family("llada-tiny", "LLaDA generate() with a suffix", _llada, prompt_seed=1000, prompt_length=6,
               batch_lengths=(1, 4, 9))
DREAM = Family("dream-tiny", "Dream diffusion_generate with a suffix", _dream, prompt_seed=2000, prompt_length=7,
               batch_lengths=(1, 5, 11))


def _infill(family: Family, params: SamplingParams, suffix=SUFFIX, model_seed: int = 0) -> list[int]:
    return family.llm(model_seed).infill(family.prompt, suffix, params=params).token_ids


@pytest.mark.parametrize("params", [
    SamplingParams(gen_length=16, block_length=16, steps=16, seed=1),
    SamplingParams(gen_length=24, block_length=8, steps=12, seed=2),
    SamplingParams(gen_length=16, block_length=8, steps=8, temperature=0.8, seed=3),
    SamplingParams(gen_length=16, block_length=8, steps=16, remasking="random", seed=4),
    SamplingParams(gen_length=16, block_length=8, steps=8, cfg_scale=1.5, seed=5),
], ids=["one-block", "blocks", "sampled", "random-order", "cfg"])
@pytest.mark.parametrize("model_seed", [0, 1])
def test_llada_infill_equals_the_loop_with_a_fixed_suffix(params, model_seed):
    got = _infill(LLADA, params, model_seed=model_seed)
    want = _llada(LLADA.model(model_seed), LLADA.prompt, params, params.seed, LLADA.config, suffix=SUFFIX)
    assert got == want
    plain = LLADA.llm(model_seed).generate([LLADA.prompt], params)[0].token_ids
    assert got != plain  # the suffix is seen: a random model's canvas changes with it


@pytest.mark.parametrize("params", [
    SamplingParams(gen_length=16, steps=16, seed=1),
    SamplingParams(gen_length=24, steps=8, seed=2),
    SamplingParams(gen_length=16, steps=8, temperature=0.7, seed=3),
    SamplingParams(gen_length=16, steps=8, remasking="entropy", alg_temp=0.5, seed=4),
], ids=["greedy", "parallel", "sampled", "entropy-alg-temp"])
def test_dream_infill_equals_the_loop_with_a_fixed_suffix(params):
    got = _infill(DREAM, params)
    assert got == _dream(DREAM.model(0), DREAM.prompt, params, params.seed, DREAM.config, suffix=SUFFIX)


def test_early_stop_fills_the_canvas_not_the_suffix():
    """A model that often predicts EOS, with early_stop: the blocks after the EOS are filled with EOS up to the
    suffix, which stays as given."""
    eos = LLADA.config.eos_token_id
    llm = LLADA.llm(0, torch.float64, (eos,))
    params = SamplingParams(gen_length=24, block_length=8, steps=24, seed=1, early_stop=True)
    engine = llm.engine
    suffix = SUFFIX[:2]
    rid = engine.add_request(LLADA.prompt, params, suffix=suffix)
    req = engine.scheduler.waiting[-1]
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o.output for o in engine.step() if o.finished})
    out = outs[rid]
    assert eos in out.token_ids[:8] and out.token_ids[8:] == [eos] * 16 and out.nfe == 8  # stopped after block 0
    assert req.seq[:len(LLADA.prompt)].tolist() == LLADA.prompt and req.seq[req.canvas_end:].tolist() == suffix


@pytest.mark.parametrize("family", [LLADA, DREAM], ids=["llada", "dream"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_mixed_infill_and_plain_batch_is_batch_invariant(family, cache):
    llm = family.llm(0)
    prompts = family.batch_prompts
    suffixes = [SUFFIX, None, random_prompt(3, 5)]
    block = 8 if family is LLADA else 16
    params = SamplingParams(gen_length=16, block_length=block, steps=8, temperature=0.6, seed=9, cache=cache)
    batch = [o.token_ids for o in llm.generate(prompts, params, suffix=suffixes)]
    alone = [llm.generate(p, params, suffix=s)[0].token_ids for p, s in zip(prompts, suffixes, strict=True)]
    assert batch == alone


@pytest.mark.parametrize("family", [LLADA, DREAM], ids=["llada", "dream"])
def test_cache_refreshed_every_step_is_the_no_cache_infill(family):
    block = 8 if family is LLADA else 16
    base = dict(gen_length=16, block_length=block, steps=8, seed=5, temperature=0.7)
    want = _infill(family, SamplingParams(**base))
    for mode in ("prefix", "dual"):
        assert _infill(family, SamplingParams(**base, cache=mode, cache_refresh=1)) == want


def test_dual_cache_reads_the_suffix_from_the_cache():
    """After a block's refresh step, a dual-cache step recomputes only the block: the suffix's K/V come from the
    cache, equal to a full forward's at the refresh (layer 0: exact where no canvas token changed before it)."""
    llm = LLADA.llm(0)
    engine = llm.engine
    params = SamplingParams(gen_length=16, block_length=8, steps=8, seed=1, cache="dual")
    rid = engine.add_request(LLADA.prompt, params, suffix=SUFFIX)
    engine.step()  # the refresh step: writes prefix, canvas and suffix
    req = next(r for r in engine.running if r.request_id == rid)
    lo, hi, read, write = recompute(req)
    start, end = req.block_span
    assert (lo, hi, write) == (start, end, None) and read == [(0, start), (end, req.seq_len)]
    assert req.seq_len == len(LLADA.prompt) + 16 + len(SUFFIX) and req.canvas_end == req.seq_len - len(SUFFIX)
    assert req.seq[req.canvas_end:].tolist() == SUFFIX
    slots = engine.kv_cache.slots(req.pages, 0, req.seq_len)
    fresh = LLADA.prompt + [LLADA.config.mask_token_id] * 16 + SUFFIX  # what the refresh step saw
    k, v = _full_kv(LLADA.model(0), fresh)
    tail = slots[req.canvas_end:]
    torch.testing.assert_close(engine.kv_cache.k[:, tail], k[:, req.canvas_end:], rtol=0, atol=1e-12)
    torch.testing.assert_close(engine.kv_cache.v[:, tail], v[:, req.canvas_end:], rtol=0, atol=1e-12)
    engine.abort(rid)


def test_block_diffusion_models_refuse_a_suffix():
    model = build_model(from_name("sdar-tiny").config, dtype=torch.float32).init_random_(0).eval()
    llm = LLM.from_model(model)
    with pytest.raises(ValueError, match="infilling needs full attention"):
        llm.engine.add_request([1, 2, 3], SamplingParams(gen_length=8, block_length=4, steps=8), suffix=[4, 5])


@pytest.mark.parametrize("suffix, match", [
    ("abc", "takes token ids as its suffix"),
    ([1, "x"], "suffix must be a list of integer token ids"),
    ([10 ** 9], "suffix holds token ids outside the vocabulary"),
    ([LLADA.config.mask_token_id], "suffix contains the mask token id"),
    (7, "suffix must be a list of integer token ids"),
])
def test_bad_suffixes_are_refused_when_added(suffix, match):
    engine = LLADA.llm(0).engine
    with pytest.raises(ValueError, match=match):
        engine.add_request(LLADA.prompt, SamplingParams(gen_length=8, steps=8), suffix=suffix)
    assert not engine.has_unfinished()


def test_suffix_counts_against_the_model_length_and_conversations():
    engine = LLADA.llm(0).engine
    limit = LLADA.config.max_position_embeddings
    params = SamplingParams(gen_length=8, steps=8)
    with pytest.raises(ValueError, match=r"\+ suffix \(\d+ tokens\) = \d+ exceeds the model's maximum length"):
        engine.add_request(LLADA.prompt, params, suffix=[1] * (limit - len(LLADA.prompt) - 7))
    with pytest.raises(ValueError, match="cannot retain or continue"):
        engine.add_request(LLADA.prompt, SamplingParams(gen_length=8, steps=8, cache="prefix"), suffix=[1],
                           retain=True)
    assert not engine.has_unfinished()


def test_llm_infill_and_generate_suffix_arguments():
    llm = LLADA.llm(0)
    params = SamplingParams(gen_length=8, steps=8, seed=1)
    assert llm.infill(LLADA.prompt, SUFFIX, 8, params=params).token_ids == \
        llm.generate(LLADA.prompt, params, suffix=SUFFIX)[0].token_ids
    # an empty suffix is a plain generation; infill refuses it
    assert llm.generate(LLADA.prompt, params, suffix=[])[0].token_ids == llm.generate(LLADA.prompt, params)[0].token_ids
    with pytest.raises(ValueError, match="non-empty suffix"):
        llm.infill(LLADA.prompt, [], params=params)
    with pytest.raises(ValueError, match="one entry per prompt"):
        llm.generate([LLADA.prompt, LLADA.prompt], params, suffix=[SUFFIX])
    with pytest.raises(ValueError, match="disagrees with params.gen_length"):
        llm.infill(LLADA.prompt, SUFFIX, 16, params=params)
    with pytest.raises(ValueError, match="a suffix must be a string or a list of token ids"):
        llm.generate([LLADA.prompt], params, suffix=[3.5])
    assert not llm.engine.has_unfinished()
