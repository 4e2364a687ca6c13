"""Decoding and revision policies against oracles written plainly (``oracles_parallel``), and in mixed batches.

Models are random tiny checkpoints in float64, so that threshold and ranking decisions are not decided by
rounding between the engine (LM head on candidate rows) and the oracle (plain full forward).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from oracles_parallel import fastdllm_generate

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.models import build_model
from diffuse_engine.policies import DECODING, REVISION
from diffuse_engine.presets import from_name


@functools.cache
def _llm(preset: str = "llada-tiny", layers: int | None = None) -> LLM:
    cfg = from_name(preset).config
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    return LLM.from_model(build_model(cfg, dtype=torch.float64).init_random_(0).eval())


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_prompt(n, i) for i, n in enumerate((2, 7, 12))]


def test_registry_names_match_sampling_params():
    from diffuse_engine.sampling_params import POLICIES, REVISIONS

    assert set(DECODING) == set(POLICIES) and set(REVISION) == set(REVISIONS)


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_threshold_equals_fastdllm(threshold):
    llm = _llm()
    mask = llm.model.config.mask_token_id
    params = SamplingParams(gen_length=16, block_length=8, policy="threshold", threshold=threshold, seed=0)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want, nfe = fastdllm_generate(llm.model, prompt, gen_length=16, block_length=8, mask_id=mask,
                                      threshold=threshold)
        assert (out.token_ids, out.nfe) == (want, nfe)


@pytest.mark.parametrize("factor", [0.25, 1.0, 2.0, 4.0])
def test_factor_equals_fastdllm(factor):
    llm = _llm()
    mask = llm.model.config.mask_token_id
    params = SamplingParams(gen_length=16, block_length=8, policy="factor", factor=factor, seed=0)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want, nfe = fastdllm_generate(llm.model, prompt, gen_length=16, block_length=8, mask_id=mask, factor=factor)
        assert (out.token_ids, out.nfe) == (want, nfe)


@torch.no_grad()
def _eb_oracle(model, prompt: list[int], gen_length: int, block_length: int, gamma: float) -> tuple[list[int], int]:
    """EB-sampler, greedy: per step, rank the block's masked positions by confidence and commit while the sum of
    their entropies minus the largest stays <= gamma (at least one)."""
    mask = model.config.mask_token_id
    x = torch.tensor([prompt + [mask] * gen_length])
    nfe = 0
    for b in range(gen_length // block_length):
        lo, hi = len(prompt) + b * block_length, len(prompt) + (b + 1) * block_length
        while bool((x[0, lo:hi] == mask).any()):
            nfe += 1
            logits = model(x)[0].double()
            cand = (x[0, :hi] == mask).nonzero().squeeze(1)
            cand = cand[cand >= len(prompt)]
            p = F.softmax(logits[cand], -1)
            conf, tok = p.max(-1)
            ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
            order = torch.sort(conf, descending=True, stable=True).indices
            h = ent[order]
            k = 1
            while k < len(order) and float(h[:k + 1].sum() - h[:k + 1].max()) <= gamma:
                k += 1
            x[0, cand[order[:k]]] = tok[order[:k]]
    return x[0, len(prompt):].tolist(), nfe


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_entropy_bounded_equals_oracle(gamma):
    llm = _llm()
    outs = llm.generate(PROMPTS, SamplingParams(gen_length=16, block_length=8, policy="eb", eb_gamma=gamma, seed=0))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert (out.token_ids, out.nfe) == _eb_oracle(llm.model, prompt, 16, 8, gamma)


SETTINGS = [
    dict(),
    dict(cache="prefix"),
    dict(cache="dual", policy="threshold", threshold=0.3),
    dict(policy="factor", factor=2.0, cache="dual", cache_refresh=2),
    dict(policy="eb", eb_gamma=0.5, remasking="topk_margin"),
    dict(revision="remdm", remdm_variant="conf", remdm_eta=0.5),
    dict(revision="remdm", remdm_variant="cap", remdm_eta=0.3, cache="prefix"),
    dict(policy="threshold", threshold=0.2, revision="wino", verify_threshold=0.6),
    dict(revision="edit", edit_margin=0.0, cache="dual", temperature=0.8),
    dict(remasking="random", policy="threshold", threshold=0.5, revision="remdm", remdm_variant="rescale"),
    dict(cfg_scale=0.5, cache="dual", revision="wino", verify_threshold=0.5),
]


@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
def test_mixed_batch_equals_each_alone(preset):
    """Every setting decodes the same tokens alone and in one batch with all the others."""
    llm = _llm(preset)
    params = [SamplingParams(gen_length=16, block_length=8, steps=8, seed=i, **kw) for i, kw in enumerate(SETTINGS)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output
    for rid, want in zip(ids, alone, strict=True):
        assert (done[rid].token_ids, done[rid].nfe, done[rid].num_revised) == (want.token_ids, want.nfe,
                                                                               want.num_revised)


def _trace(llm: LLM, prompt: list[int], params: SamplingParams):
    """Step outputs of one request, and a replay of them on a canvas that must end at the final tokens."""
    engine = llm.engine
    engine.add_request(prompt, params)
    mask = llm.model.config.mask_token_id
    canvas = [mask] * params.gen_length
    steps = []
    while engine.has_unfinished():
        (out,) = engine.step()
        for pos, old, new in out.revised:
            assert canvas[pos] == old and old != mask and new != old
            canvas[pos] = new
        for pos, tok in out.committed:
            assert canvas[pos] == mask
            canvas[pos] = tok
        assert canvas == out.canvas
        steps.append(out)
    return steps


@pytest.mark.parametrize("kw", [dict(revision="remdm", remdm_variant="rescale", remdm_eta=1.0),
                                dict(revision="remdm", remdm_variant="conf", remdm_eta=0.8, cache="dual"),
                                dict(policy="threshold", threshold=0.1, revision="wino", verify_threshold=0.99),
                                dict(revision="edit", edit_margin=0.0)])
def test_revisions_are_recorded_and_blocks_finish(kw):
    llm = _llm()
    params = SamplingParams(gen_length=16, block_length=8, steps=8, seed=2, **kw)
    steps = _trace(llm, PROMPTS[1], params)
    revised = sum(len(s.revised) for s in steps)
    assert revised > 0 and steps[-1].finished
    assert steps[-1].output.num_revised == revised
    assert llm.model.config.mask_token_id not in steps[-1].output.token_ids
    if params.policy == "fixed":
        assert len(steps) == params.steps  # revision does not cost forwards
    else:
        assert len(steps) <= 2 * 16


def test_remdm_cap_rate():
    """cap: each committed token of the block is re-masked with probability min(eta, sigma_max)."""
    llm = _llm()
    steps = _trace(llm, PROMPTS[0], SamplingParams(gen_length=64, block_length=64, steps=64, seed=9,
                                                   revision="remdm", remdm_variant="cap", remdm_eta=0.1))
    eligible = sum(s.step for s in steps[1:-1])  # committed tokens seen by the steps that may revise
    remasked = sum(len(s.revised) for s in steps)
    rate = remasked / eligible
    assert 0.03 < rate <= 0.1 + 3 * (0.1 / eligible) ** 0.5  # sigma_max < 1 near the end lowers the mean


def test_verification_hides_the_verified_position():
    """With one layer, a verification query equals a full forward with the verified position masked."""
    from diffuse_engine.engine import step as device_step

    llm = _llm("llada-tiny", layers=1)
    model, engine = llm.model, llm.engine
    cfg = model.config
    params = SamplingParams(gen_length=8, block_length=8, steps=8, seed=0, revision="wino")
    engine.add_request(PROMPTS[1], params)
    engine._admit()
    (req,) = engine.running
    gen = torch.Generator().manual_seed(0)
    start, end = req.block_span
    tokens = torch.randint(0, 256, (5,), generator=gen)
    req.seq[start:start + 5] = tokens  # the host mirror, and the same on the device
    base = req.slot * engine.store.capacity
    engine.store.tokens[base + start:base + start + 5] = tokens
    plan = engine._current_plan()
    with torch.inference_mode():
        hidden = device_step.forward(model, plan, engine.store, cfg.mask_token_id)
        cur = engine.store.tokens[plan.t["pad_flat"]]
        p_current, top_token, _ = device_step._verification(model, plan, hidden, cur, torch.float64)
    col = start - req.window_lo
    for j in range(5):
        p = start + j
        x = req.seq.clone()
        x[p] = cfg.mask_token_id
        probs = F.softmax(model(x[None])[0, p].double(), -1)
        assert p_current[0, col + j].item() == pytest.approx(probs[req.seq[p]].item(), abs=1e-12)
        assert top_token[0, col + j].item() == int(probs.argmax())
    engine.abort(req.request_id)
