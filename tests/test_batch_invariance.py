"""A request's tokens do not depend on the batch it runs in (DESIGN.md section 1, edge 8).

float32 tiny LLaDA and Dream (the engine's working precision on the CPU), 8 prompts of 1 to 40 tokens:
every request decodes to the same tokens alone and inside a batch of 8, greedy and sampled, with shared and
with mixed settings. Equality is exact (no tolerance): batch invariance is a guarantee, not an approximation.
"""

from __future__ import annotations

import functools

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

FAMILIES = ("llada-tiny", "dream-tiny")
LENGTHS = (1, 40, 7, 23, 3, 31, 12, 17)  # mixed, not sorted


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


PROMPTS = _prompts()


@functools.cache
def _llm(name: str) -> LLM:
    return LLM.from_model(build_model(from_name(name).config, dtype=torch.float32).init_random_(3))


def _assert_invariant(llm: LLM, prompts, params) -> None:
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    bad = [i for i in range(len(prompts)) if alone[i] != batched[i]]
    assert not bad, f"requests {bad} decode differently in the batch: " + "; ".join(
        f"#{i} ({len(prompts[i])} prompt tokens) alone {alone[i]} batched {batched[i]}" for i in bad)
    # and in a different order, with a repeated request
    order = [5, 0, 7, 2, 2, 6, 1, 4, 3]
    shuffled = [o.token_ids for o in llm.generate([prompts[i] for i in order], [params[i] for i in order])]
    assert shuffled == [alone[i] for i in order]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_same_settings(name, temperature):
    llm = _llm(name)
    block = 8 if name.startswith("llada") else 24
    params = [SamplingParams(gen_length=24, block_length=block, steps=12, temperature=temperature, seed=700 + i)
              for i in range(len(PROMPTS))]
    _assert_invariant(llm, PROMPTS, params)


def _mixed(name: str) -> list[SamplingParams]:
    if name.startswith("llada"):
        settings = [
            dict(gen_length=32, block_length=8, steps=16),
            dict(gen_length=24, block_length=24, steps=24, temperature=0.8),
            dict(gen_length=16, block_length=8, steps=4, remasking="random"),
            dict(gen_length=30, block_length=10, steps=9, temperature=0.8, remasking="random"),
            dict(gen_length=8, block_length=8, steps=8, cfg_scale=1.0),
            dict(gen_length=24, block_length=12, steps=6, temperature=0.8, cfg_scale=0.5, logits_eos_inf=True),
            dict(gen_length=20, block_length=4, steps=10, confidence_eos_eot_inf=True),
            dict(gen_length=12, block_length=12, steps=3, temperature=0.8, top_k=20, top_p=0.9),
        ]
    else:
        settings = [
            dict(gen_length=32, steps=16),
            dict(gen_length=24, steps=24, temperature=0.8, remasking="topk_margin"),
            dict(gen_length=16, steps=4, remasking="entropy"),
            dict(gen_length=30, steps=9, temperature=0.8, remasking="origin"),
            dict(gen_length=8, steps=8, remasking="maskgit_plus", alg_temp=0.5),
            dict(gen_length=24, steps=6, temperature=0.8, top_p=0.9, alg_temp=1.0, remasking="entropy"),
            dict(gen_length=20, block_length=4, steps=10, temperature=0.8, top_k=15),
            dict(gen_length=12, steps=3, remasking="origin", eps=0.05),
        ]
    return [SamplingParams(**s, seed=900 + i) for i, s in enumerate(settings)]


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_settings(name):
    _assert_invariant(_llm(name), PROMPTS, _mixed(name))


def test_same_prompt_different_seeds_in_one_batch():
    llm = _llm("llada-tiny")
    params = [SamplingParams(gen_length=16, block_length=8, steps=8, temperature=1.0, seed=s) for s in (1, 2, 1)]
    outs = [o.token_ids for o in llm.generate([PROMPTS[2]] * 3, params)]
    assert outs[0] == outs[2]
    assert outs[0] != outs[1]
