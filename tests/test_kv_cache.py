"""The paged KV cache: prefix / dual caches for LLaDA and Dream, the exact block cache of block-diffusion
models (SDAR), and page accounting.

Models are random tiny checkpoints in float64 (decisions are not decided by rounding). What must hold exactly:
- no cache: tokens of the engine-core path, also when the batch mixes cached and uncached requests;
- prefix / dual: at a refresh step the cache holds the K/V of a full forward (all layers), and layer 0's
  K/V of unchanged tokens stay equal to a recomputation at every later step (they depend only on the token and
  its position); deeper layers are approximate by design;
- block-diffusion: tokens equal SDAR's loop with every block recomputed, and the cached K/V of finished
  blocks equal a full recomputation in every layer.
"""

from __future__ import annotations

import functools

import pytest
import torch
from oracles_parallel import sdar_generate

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine import EngineConfig
from diffuse_engine.engine.attention_plan import AttentionPlan, SeqPlan
from diffuse_engine.engine.kv_cache import PagedKVCache
from diffuse_engine.errors import KVCacheFullError
from diffuse_engine.models import TokenLayout, build_model
from diffuse_engine.presets import from_name


@functools.cache
def _llm(preset: str, seed: int = 0, **engine) -> LLM:
    model = build_model(from_name(preset).config, dtype=torch.float64).init_random_(seed).eval()
    return LLM.from_model(model, engine_config=EngineConfig(**engine) if engine else None)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_prompt(n, i) for i, n in enumerate((3, 8, 13))]


def _run(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


# ------------------------------------------------------------------------------------------------ pool
def test_pool_allocates_frees_and_refuses():
    cache = PagedKVCache(2, 1, 4, num_pages=4, page_size=8, dtype=torch.float32, device="cpu")
    a = cache.allocate(17)  # 3 pages
    assert a.numel() == 3 and cache.num_free_pages == 1
    with pytest.raises(KVCacheFullError, match="free pages"):
        cache.allocate(9)
    cache.free(a)
    assert cache.num_free_pages == 4
    with pytest.raises(ValueError, match="not a set of page ids"):
        cache.free(torch.tensor([7]))
    b = cache.allocate(32)
    assert sorted(b.tolist()) == [0, 1, 2, 3]
    assert cache.slots(b, 7, 10).tolist() == [int(b[0]) * 8 + 7, int(b[1]) * 8, int(b[1]) * 8 + 1]
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 1, 4, num_pages=1, page_size=0, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------------------------------- prefix / dual
@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
def test_no_cache_requests_unchanged_in_a_mixed_batch(preset):
    """Uncached requests batched with cached ones (the planned forward) decode exactly as in the core path."""
    llm = _llm(preset)
    plain = SamplingParams(gen_length=16, block_length=8, steps=8, seed=3)
    alone = _run(llm, PROMPTS, plain)
    cached = SamplingParams(gen_length=16, block_length=8, steps=8, seed=3, cache="dual")
    engine = llm.engine
    ids = [engine.add_request(p, plain) for p in PROMPTS] + [engine.add_request(PROMPTS[0], cached)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output.token_ids
    assert [done[i] for i in ids[:3]] == alone


def _full_kv(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of every layer for a full forward of ``tokens`` (through a refresh plan into a private pool)."""
    cfg = model.config
    pool = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8, 16, model.dtype, "cpu")
    pages = pool.allocate(len(tokens))
    n = len(tokens)
    plan = SeqPlan(0, n, torch.arange(n), [], (0, n), pages)
    layout = TokenLayout.packed([n], kv=AttentionPlan(pool, [plan], torch.device("cpu")))
    model.hidden_states(torch.tensor(tokens), torch.arange(n), layout)
    slots = pool.slots(pages, 0, n)
    return pool.k[:, slots], pool.v[:, slots]


@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_kv_equal_recomputation_where_exact(preset, mode):
    llm = _llm(preset)
    engine, model = llm.engine, llm.model
    params = SamplingParams(gen_length=16, block_length=8, steps=8, seed=1, cache=mode)
    rid = engine.add_request(PROMPTS[1], params)
    req = None
    checked = 0
    for step in range(7):
        engine.step()
        req = next(r for r in engine.running if r.request_id == rid)
        slots = engine.kv_cache.slots(req.pages, 0, req.seq_len)
        if step == 0:  # the refresh forward saw the sequence of step 0
            seq0 = req.seq.clone()
            seq0[req.seq != req.mask_id] = req.mask_id  # before the first commit: prompt + masks
            seq0[: req.prompt_len] = req.seq[: req.prompt_len]
            k, v = _full_kv(model, seq0.tolist())
            torch.testing.assert_close(engine.kv_cache.k[:, slots], k, rtol=0, atol=1e-12)
            torch.testing.assert_close(engine.kv_cache.v[:, slots], v, rtol=0, atol=1e-12)
        if req.block_step == 0:  # a block just ended: the next step refreshes the cache
            continue
        k, _ = _full_kv(model, req.seq.tolist())
        start, end = req.block_span
        kept = list(range(0, start)) + (list(range(end, req.seq_len)) if mode == "dual" else [])
        torch.testing.assert_close(engine.kv_cache.k[0, slots[kept]], k[0, kept], rtol=0, atol=1e-12)
        checked += 1
        if step >= 5:  # a later block: deeper layers of the prefix are stale by design (bidirectional model)
            assert not torch.allclose(engine.kv_cache.k[-1, slots[kept]], k[-1, kept])
    assert checked >= 5
    engine.abort(rid)
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
def test_refresh_every_step_is_the_no_cache_decode(preset):
    """A cache refreshed at every step recomputes everything each step: the no-cache tokens exactly."""
    llm = _llm(preset)
    base = dict(gen_length=16, block_length=8, steps=8, seed=5, temperature=0.7)
    want = _run(llm, PROMPTS, SamplingParams(**base))
    for mode in ("prefix", "dual"):
        assert _run(llm, PROMPTS, SamplingParams(**base, cache=mode, cache_refresh=1)) == want


def test_cfg_with_cache_runs_and_frees_both_streams():
    llm = _llm("llada-tiny")
    outs = llm.generate(PROMPTS, SamplingParams(gen_length=16, block_length=8, steps=8, cfg_scale=1.0, cache="dual",
                                                seed=0))
    assert all(len(o.token_ids) == 16 for o in outs)
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


# -------------------------------------------------------------------------------------- block diffusion
@pytest.mark.parametrize("plen", [4, 6, 9])
@pytest.mark.parametrize("steps_per_block", [4, 2, 1])
def test_block_diffusion_equals_sdar_loop(plen, steps_per_block):
    llm = _llm("sdar-tiny")
    cfg = llm.model.config
    gen = 16
    prompt = _prompt(plen, 40 + plen)
    want, nfe = sdar_generate(llm.model, prompt, gen_length=gen, block_length=cfg.block_size,
                              steps_per_block=steps_per_block, mask_id=cfg.mask_token_id)
    params = SamplingParams(gen_length=gen, block_length=cfg.block_size,
                            steps=steps_per_block * gen // cfg.block_size, seed=0)
    out = llm.generate([prompt], params)[0]
    assert out.token_ids == want
    assert out.nfe == nfe


def test_block_cache_equals_full_recomputation():
    llm = _llm("sdar-tiny")
    engine, model = llm.engine, llm.model
    b = model.config.block_size
    rid = engine.add_request(_prompt(6, 7), SamplingParams(gen_length=16, block_length=b, steps=8, seed=0))
    for _ in range(7):
        engine.step()
    req = next(r for r in engine.running if r.request_id == rid)
    n = req.cached_upto
    assert n >= 2 * b
    seq = req.seq[:n].tolist()
    cfg = model.config
    pool = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8, 16, model.dtype, "cpu")
    pages = pool.allocate(n)
    plan = SeqPlan(0, n, torch.arange(n), [], (0, n), pages, block_size=b)
    model.hidden_states(torch.tensor(seq), torch.arange(n),
                        TokenLayout.packed([n], block_size=b, kv=AttentionPlan(pool, [plan], torch.device("cpu"))))
    ours = engine.kv_cache.slots(req.pages, 0, n)
    ref = pool.slots(pages, 0, n)
    torch.testing.assert_close(engine.kv_cache.k[:, ours], pool.k[:, ref], rtol=0, atol=1e-12)
    torch.testing.assert_close(engine.kv_cache.v[:, ours], pool.v[:, ref], rtol=0, atol=1e-12)
    engine.abort(rid)


def test_block_diffusion_rejects_other_block_length():
    llm = _llm("sdar-tiny")
    with pytest.raises(ValueError, match="block_length=4"):
        llm.engine.add_request([1, 2, 3], SamplingParams(gen_length=16, block_length=8))


# ------------------------------------------------------------------------------------------------ memory
def test_admission_waits_for_pages_and_frees_on_finish_and_abort():
    llm = _llm("llada-tiny", 0, page_size=8, kv_cache_tokens=64)  # 8 pages: two requests of 32 tokens
    engine = llm.engine
    params = SamplingParams(gen_length=24, block_length=8, steps=6, cache="prefix", seed=0)
    ids = [engine.add_request(_prompt(8, i), params) for i in range(5)]
    peak = 0
    aborted = False
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, len(engine.running))
        assert engine.kv_cache.num_used_pages == 4 * len(engine.running)
        if not aborted and len(engine.running) == 2:
            engine.abort(engine.running[0].request_id)
            aborted = True
            assert engine.kv_cache.num_used_pages == 4
    assert peak == 2 and engine.kv_cache.num_free_pages == 8
    assert ids[0] not in engine._known
    with pytest.raises(ValueError, match="more than the whole cache"):
        engine.add_request(_prompt(8, 0), SamplingParams(gen_length=64, block_length=8, steps=8, cache="dual"))


def test_no_growth_across_1000_requests():
    llm = _llm("llada-tiny", 0, page_size=4, kv_cache_tokens=256)
    engine = llm.engine
    params = SamplingParams(gen_length=4, block_length=4, steps=1, cache="dual", seed=0)
    pool_k = engine.kv_cache.k if engine.kv_cache is not None else None
    for i in range(1000):
        engine.add_request(_prompt(3 + i % 5, i), params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert engine.kv_cache.num_used_pages <= engine.kv_cache.num_pages
    cache = engine.kv_cache
    assert cache.num_free_pages == cache.num_pages and not engine._known and not engine.running
    assert pool_k is None or cache.k is pool_k  # one pool, never reallocated
    assert cache.bytes == 2 * llm.model.config.num_layers * 256 * llm.model.config.num_kv_heads * \
        llm.model.config.head_dim * 8


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_requests_batch_invariant_in_fp32(mode):
    """Equal-shape cached sequences attend as one batched call: bit for bit what each gets alone (fp32)."""
    model = build_model(from_name("dream-tiny").config, dtype=torch.float32).init_random_(3).eval()
    llm = LLM.from_model(model)
    prompts = [_prompt(9, 60 + i) for i in range(5)]
    params = SamplingParams(gen_length=24, block_length=8, steps=12, cache=mode, temperature=0.9, seed=4)
    batch = llm.generate(prompts, params)
    for p, out in zip(prompts, batch, strict=True):
        assert llm.generate([p], params)[0].token_ids == out.token_ids
    plan_groups = []
    original = AttentionPlan.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        plan_groups.append(len(self.groups))

    AttentionPlan.__init__ = spy
    try:
        llm.generate(prompts, params)
    finally:
        AttentionPlan.__init__ = original
    assert max(plan_groups) >= 1  # the batched path ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plan_through_the_triton_cached_kernel_equals_sdpa(monkeypatch, backend_env, dtype):
    """Groups of dual- and prefix-pattern sequences through ops.block_attention_cached (Triton, here under the
    interpreter) give what the SDPA path gives."""
    import diffuse_engine.engine.attention_plan as kv

    gen = torch.Generator().manual_seed(0)
    layers, kv_heads, heads, d, page = 2, 2, 4, 16, 8
    cache = PagedKVCache(layers, kv_heads, d, 32, page, dtype, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen).to(dtype))
    seqs = []
    for length, lo, n, dual in ((40, 13, 8, True), (40, 9, 8, True), (30, 20, 10, False), (30, 11, 10, False)):
        pages = cache.allocate(length)
        read = [(0, lo)] + ([(lo + n, length)] if dual else [])
        seqs.append(SeqPlan(lo, n, torch.arange(lo, lo + n), read, None, pages))
    total = sum(s.num_tokens for s in seqs)
    q = torch.randn(total, heads, d, generator=gen).to(dtype)
    k = torch.randn(total, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, d, generator=gen).to(dtype)
    backend_env("DIFFUSE_ATTENTION_BACKEND", "sdpa")
    want = AttentionPlan(cache, seqs, torch.device("cpu")).attend(1, q, k, v)
    backend_env("DIFFUSE_ATTENTION_BACKEND", "triton")
    plan = AttentionPlan(cache, seqs, torch.device("cpu"))
    assert plan.groups and all(g.kernel is not None for g in plan.groups) and not plan.single
    calls = []
    original = kv._kernel_attend
    monkeypatch.setattr(kv, "_kernel_attend", lambda *a: calls.append(1) or original(*a))
    got = plan.attend(1, q, k, v)
    assert len(calls) == 2  # groups of equal fresh lengths (the kernel reads each one's own cached length)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_cached_decode_with_triton_kernels_matches_sdpa(backend_env):
    """End to end under the Triton interpreter: dual-cache decoding through the Triton kernels (packed attention
    at refresh steps, the cached-block kernel in between) gives the tokens of the SDPA path."""
    model = build_model(from_name("llada-tiny").config, dtype=torch.float32).init_random_(2).eval()
    llm = LLM.from_model(model)
    prompts = [_prompt(6, 80 + i) for i in range(3)]
    params = SamplingParams(gen_length=16, block_length=8, steps=8, cache="dual", seed=1)
    backend_env("DIFFUSE_ATTENTION_BACKEND", "sdpa")
    want = _run(llm, prompts, params)
    backend_env("DIFFUSE_ATTENTION_BACKEND", "triton")
    assert _run(llm, prompts, params) == want
