"""AsyncEngine: concurrent streams on one asyncio loop with the engine stepping in a background thread; deltas
are final text only; canvas snapshots; cancellation frees the slot and KV pages; stop strings."""

from __future__ import annotations

import asyncio

import pytest

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine import EngineConfig
from diffuse_engine.entrypoints.async_engine import AsyncEngine
from diffuse_engine.quality.tasks import get_task

TASK = get_task("addition")
PROMPTS = [ex.prompt for ex in TASK.test_set(40)]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("addition", device="cpu", engine_config=EngineConfig(max_num_seqs=8, page_size=4,
                                                                     kv_cache_tokens=512))


def _collect(engine: AsyncEngine, prompt, params, **kw):
    async def go():
        outs = []
        async for out in engine.generate(prompt, params, **kw):
            outs.append(out)
        return outs

    return go()


def test_concurrent_streams_equal_running_alone(llm):
    params = SamplingParams(gen_length=6, steps=6, seed=0)
    alone = {p: o for p, o in zip(PROMPTS[:32], llm.generate(PROMPTS[:32], params), strict=True)}
    engine = AsyncEngine(llm.engine)

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params, request_id=f"r{i}") for i, p in
                                      enumerate(PROMPTS[:32])))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for prompt, outs in zip(PROMPTS[:32], results, strict=True):
        assert outs[-1].finished and outs[-1].finish_reason == alone[prompt].finish_reason
        assert "".join(o.text_delta for o in outs) == outs[-1].text == alone[prompt].text
        assert sum(len(o.token_ids_delta) for o in outs) == 6
    assert engine.stats()["finished"] == 32 and engine.stats()["running"] == 0


def test_deltas_are_final_and_snapshots_show_the_canvas(llm):
    engine = AsyncEngine(llm.engine)
    params = SamplingParams(gen_length=6, block_length=2, steps=6, seed=0, cache="dual")
    try:
        outs = asyncio.run(_collect(engine, PROMPTS[0], params, output_kind="canvas"))
    finally:
        engine.shutdown()
    mask = llm.model.config.mask_token_id
    assert len(outs) == 6 and all(o.canvas is not None for o in outs)
    text = ""
    for o in outs:
        c = o.canvas
        assert c.masked == [i for i, t in enumerate(c.tokens) if t == mask]
        assert all(c.confidences[i] > 0 for i in range(6) if i not in c.masked)
        assert o.text == text + o.text_delta
        text = o.text
    assert outs[-1].text == outs[-1].output.text


def test_cancel_mid_stream_frees_slot_and_pages(llm):
    engine = AsyncEngine(llm.engine)
    params = SamplingParams(gen_length=6, block_length=2, steps=6, seed=0, cache="prefix")

    async def main():
        gen = engine.generate(PROMPTS[1], params, request_id="cancel-me", output_kind="canvas")
        first = await gen.__anext__()
        await gen.aclose()  # the consumer leaves: the request is aborted at the next step boundary
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not engine.engine.has_unfinished():
                break
        return first

    try:
        first = asyncio.run(main())
    finally:
        engine.shutdown()
    assert not first.finished
    cache = llm.engine.kv_cache
    assert not llm.engine.has_unfinished() and cache.num_free_pages == cache.num_pages
    assert engine.stats()["aborted"] == 1


def test_bad_request_raises_and_engine_keeps_serving(llm):
    engine = AsyncEngine(llm.engine)

    async def main():
        with pytest.raises(ValueError, match="gen_length"):
            await _collect(engine, PROMPTS[0], SamplingParams(gen_length=10**6))
        with pytest.raises(ValueError, match="output_kind"):
            await _collect(engine, PROMPTS[0], None, output_kind="tokens")
        return await _collect(engine, PROMPTS[0], SamplingParams(gen_length=6, seed=0))

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outs[-1].finished


def test_stop_strings_end_the_answer(llm):
    ex = TASK.test_set(1)[0]
    full = llm.generate([ex.prompt], SamplingParams(gen_length=6, seed=0))[0]
    stop = full.text[2:4]
    out = llm.generate([ex.prompt], SamplingParams(gen_length=6, seed=0, stop=[stop, "zz"]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]
    with pytest.raises(ValueError, match="stop must be"):
        SamplingParams(stop=[""])


def test_stop_string_saves_blocks(llm):
    """A stop string found in a finished block ends the request before the later blocks run."""
    ex = TASK.test_set(1)[0]
    full = llm.generate([ex.prompt], SamplingParams(gen_length=6, block_length=2, steps=6, seed=0))[0]
    out = llm.generate([ex.prompt], SamplingParams(gen_length=6, block_length=2, steps=6, seed=0,
                                                   stop=[full.text[1]]))[0]
    assert out.finish_reason == "stop" and out.nfe < full.nfe


def test_tool_call_turn_reuses_the_cached_prefix(llm):
    """Stop at a marker, append a tool result, continue: the earlier turn's cached K/V are not recomputed."""
    engine = llm.engine
    tok = llm.tokenizer
    ex = TASK.test_set(3)[2]
    params = SamplingParams(gen_length=6, block_length=2, steps=6, seed=0, cache="prefix")
    first = engine.add_request(tok.encode(ex.prompt), params, "turn-1", retain=True)
    while engine.has_unfinished():
        outs = engine.step()
    answer = outs[0].output.token_ids
    assert first in engine.retained
    prompt2 = tok.encode(ex.prompt) + answer[:4] + tok.encode("|tool result|")
    seen = []
    model = llm.model
    original = model.hidden_states

    def counting(ids, positions, layout):
        seen.append(int(positions.min()))
        return original(ids, positions, layout)

    model.hidden_states = counting
    try:
        engine.add_request(prompt2, params, "turn-2", continue_from=first)
        while engine.has_unfinished():
            engine.step()
    finally:
        del model.hidden_states
    reused = len(tok.encode(ex.prompt)) + 4  # turn 1's prompt and its first two blocks were cached
    assert seen[0] == reused  # the first forward of turn 2 starts after the reused prefix
    assert all(p >= reused for p in seen)
    assert first not in engine.retained
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages
    with pytest.raises(ValueError, match="continue_from"):
        engine.add_request(prompt2, params, "turn-3", continue_from=first)
    with pytest.raises(ValueError, match="prefix"):
        engine.add_request(prompt2, SamplingParams(gen_length=6), "turn-4", retain=True)


def test_retained_pages_are_evicted_for_admission():
    llm = LLM("addition", device="cpu", engine_config=EngineConfig(page_size=4, kv_cache_tokens=48,
                                                                   max_retained=8))
    engine = llm.engine
    params = SamplingParams(gen_length=6, block_length=2, steps=6, seed=0, cache="dual")
    for i, ex in enumerate(TASK.test_set(6)):
        engine.add_request(llm.tokenizer.encode(ex.prompt), params, f"r{i}", retain=True)
        while engine.has_unfinished():
            engine.step()
    # 18-token sequences need 5 pages; 12 pages in all: older retained requests were evicted to admit newer ones
    assert 1 <= len(engine.retained) <= 2
    assert engine.kv_cache.num_used_pages == 5 * len(engine.retained)
    for rid in list(engine.retained):
        assert engine.release_retained(rid)
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


@pytest.mark.parametrize("stop", ["39", "0", "12", "999"])
def test_streamed_deltas_never_include_a_cut_stop_string(llm, stop):
    engine = AsyncEngine(llm.engine)
    params = SamplingParams(gen_length=6, block_length=2, steps=6, seed=0, stop=[stop])

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params) for p in PROMPTS))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    alone = llm.generate(PROMPTS, params)
    for outs, want in zip(results, alone, strict=True):
        assert "".join(o.text_delta for o in outs) == outs[-1].text == want.text
        assert stop not in want.text and outs[-1].finish_reason == want.finish_reason


def test_stop_string_final_only_in_the_last_step(llm):
    out = llm.generate(["96759+00633="], SamplingParams(gen_length=6, seed=0))[0]
    assert out.text == "097392"
    cut = llm.generate(["96759+00633="], SamplingParams(gen_length=6, seed=0, stop=["39"]))[0]
    assert (cut.text, cut.finish_reason) == ("097", "stop")
