"""One bad request never hurts another.

- A request whose own step fails (non-finite logits, or an exception raised by the forward on its rows) finishes
  alone with ``finish_reason="error"`` and a message; every other request of the batch continues and its tokens
  equal running alone; its pages are freed and nothing stays queued.
- A failure that cannot be pinned to one request fails the step's requests, and the engine stays usable.
- ``LLM.generate`` and ``AsyncEngine.generate`` clean up their requests on any exception (callback errors,
  KeyboardInterrupt, a caller that leaves while its request is being added).
- ``SamplingParams`` is frozen and validated again when a request is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
import time

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine import EngineConfig
from diffuse_engine.entrypoints.async_engine import AsyncEngine
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

POISON = 77  # a token id whose presence in a forward's input makes the injected fault fire


@functools.cache
def _model():
    return build_model(from_name("llada-tiny").config, dtype=torch.float32).init_random_(0).eval()


def _llm(**config) -> LLM:
    return LLM.from_model(_model(), engine_config=EngineConfig(kv_cache_tokens=4096, **config))


@contextlib.contextmanager
def _faulty_forward(llm: LLM, when):
    """Make the model's forward raise RuntimeError whenever ``when(ids)`` is true for its input token ids."""
    model = llm.model
    original = model.hidden_states
    calls = {"raised": 0}

    def hidden_states(ids, *args, **kwargs):
        if when(ids):
            calls["raised"] += 1
            raise RuntimeError("injected kernel fault")
        return original(ids, *args, **kwargs)

    model.hidden_states = hidden_states
    try:
        yield calls
    finally:
        del model.hidden_states


PARAMS = [
    SamplingParams(gen_length=16, block_length=8, steps=8, seed=1),
    SamplingParams(gen_length=16, block_length=8, steps=16, temperature=0.8, seed=2, cache="dual"),
    SamplingParams(gen_length=8, policy="threshold", threshold=0.5, seed=3, cache="prefix"),
    SamplingParams(gen_length=16, block_length=4, steps=8, remasking="random", seed=4, revision="remdm"),
]
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]


def _alone(params, prompts):
    llm = _llm()
    return [llm.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]


def test_a_request_whose_forward_raises_fails_alone_and_the_rest_equal_running_alone():
    llm = _llm()
    expected = _alone(PARAMS, PROMPTS)
    prompts = [*PROMPTS, [1, POISON, 3]]
    params = [*PARAMS, SamplingParams(gen_length=8, seed=5, cache="dual")]
    with _faulty_forward(llm, lambda ids: bool((ids == POISON).any())) as calls:
        outs = llm.generate(prompts, params)
    assert calls["raised"] >= 2  # the batched step, then the request's own step
    bad = outs[-1]
    assert bad.finish_reason == "error"
    assert "injected kernel fault" in bad.error and "RuntimeError" in bad.error
    for out, ref in zip(outs[:-1], expected, strict=True):
        assert out.finish_reason != "error"
        assert out.token_ids == ref.token_ids
        assert out.nfe == ref.nfe
    assert not llm.engine.has_unfinished()
    kv = llm.engine.kv_cache
    assert kv.num_free_pages == kv.num_pages  # every page came back
    assert llm.engine.num_failed_steps >= 1
    # The engine serves on, unchanged.
    again = llm.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]
    assert llm.engine.last_step_error is None


def test_a_fault_of_the_batched_step_only_reruns_each_request_alone():
    """A forward that fails only for batches (e.g. out of memory at this size): every request still finishes, with
    the tokens of running alone."""
    llm = _llm()
    expected = _alone(PARAMS, PROMPTS)
    # The forward takes every request's tokens in one packed batch: fail when it holds more tokens than the
    # longest request alone.
    limit = max(len(p) + q.gen_length for p, q in zip(PROMPTS, PARAMS, strict=True))

    def calls_when(ids):
        return ids.numel() > limit

    with _faulty_forward(llm, calls_when) as calls:
        outs = llm.generate(PROMPTS, PARAMS)
    assert calls["raised"] >= 1
    assert [o.finish_reason for o in outs] == [o.finish_reason for o in expected]
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert not llm.engine.has_unfinished()


def test_a_failure_that_cannot_be_pinned_fails_the_step_requests_and_the_engine_stays_usable():
    llm = _llm()
    with _faulty_forward(llm, lambda ids: True):
        outs = llm.generate(PROMPTS, PARAMS)
    assert all(o.finish_reason == "error" and "injected kernel fault" in o.error for o in outs)
    assert not llm.engine.has_unfinished()
    assert llm.engine.last_step_error is not None
    expected = _alone(PARAMS, PROMPTS)
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == [o.token_ids for o in expected]
    assert llm.engine.last_step_error is None


def test_non_finite_logits_fail_one_request_of_a_mixed_batch_and_pages_are_freed():
    model = build_model(from_name("llada-tiny").config, dtype=torch.float32).init_random_(0).eval()
    with torch.no_grad():
        model.model.transformer.wte.weight[POISON] = float("nan")
    llm = LLM.from_model(model, engine_config=EngineConfig(kv_cache_tokens=4096))
    clean = LLM.from_model(_model(), engine_config=EngineConfig(kv_cache_tokens=4096))
    # The clean model differs only in the poisoned row, which the clean prompts never use.
    expected = [clean.generate([p], q)[0] for p, q in zip(PROMPTS, PARAMS, strict=True)]
    outs = llm.generate([*PROMPTS, [1, POISON]], [*PARAMS, SamplingParams(gen_length=8, cache="dual")])
    assert outs[-1].finish_reason == "error" and "not finite" in outs[-1].error
    assert [o.token_ids for o in outs[:-1]] == [o.token_ids for o in expected]
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages
    assert not llm.engine.has_unfinished()


# ------------------------------------------------------------------------------------------- LLM.generate
@pytest.mark.parametrize("exc", [ValueError("callback failed"), KeyboardInterrupt()])
def test_generate_cleans_up_when_on_step_raises(exc):
    llm = _llm()

    def on_step(outputs):
        raise exc

    with pytest.raises(type(exc)):
        llm.generate(PROMPTS, PARAMS, on_step=on_step)
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages
    expected = _alone(PARAMS, PROMPTS)
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == [o.token_ids for o in expected]


def test_generate_cleans_up_when_a_later_prompt_is_refused():
    llm = _llm()
    with pytest.raises(ValueError, match="mask token"):
        llm.generate([[1, 2], [1, llm.config.mask_token_id]], PARAMS[0])
    assert not llm.engine.has_unfinished()


def test_generate_cleans_up_when_the_step_is_interrupted():
    llm = _llm()
    original = llm.engine._run_step
    count = {"n": 0}

    def interrupted():
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt
        return original()

    llm.engine._run_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS)
    del llm.engine._run_step
    assert not llm.engine.has_unfinished()
    expected = _alone(PARAMS, PROMPTS)
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == [o.token_ids for o in expected]


# ------------------------------------------------------------------------------------------- SamplingParams
def test_sampling_params_are_frozen():
    p = SamplingParams(gen_length=16, block_length=8, steps=8)
    for field, value in (("block_length", 3), ("steps", 0), ("policy", "nope"), ("gen_length", 7)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, field, value)
    assert p.block_length == 8 and p.steps == 8
    q = dataclasses.replace(p, steps=16)  # the way to derive a variant, validated again
    assert q.steps == 16
    with pytest.raises(ValueError, match="steps"):
        dataclasses.replace(p, steps=3)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="a").stop == ("a",)


@pytest.mark.parametrize("field,value,match", [
    ("block_length", 3, "block_length"),
    ("steps", 0, "steps"),
    ("policy", "greedy", "policy"),
    ("cfg_scale", 1e38, "cfg_scale"),
    ("temperature", float("nan"), "temperature"),
    ("stop", ["x"], "stop"),
])
def test_a_value_forced_past_the_frozen_dataclass_is_refused_when_added(field, value, match):
    llm = _llm()
    p = SamplingParams(gen_length=16, block_length=8, steps=8)
    object.__setattr__(p, field, value)
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request([1, 2, 3], p)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs,match", [
    ({"cfg_scale": 1e38}, "cfg_scale must be <="),
    ({"cfg_scale": 101.0}, "cfg_scale"),
    ({"temperature": 1e-300}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"alg_temp": 1e-9}, "alg_temp"),
    ({"factor": 1e30}, "factor"),
    ({"eb_gamma": 1e30}, "eb_gamma"),
    ({"gen_length": 1 << 40}, "gen_length"),
    ({"top_k": 1 << 40}, "top_k"),
    ({"stop": ["x" * 5000]}, "stop"),
])
def test_every_float_field_is_bounded(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_the_largest_cfg_scale_allowed_keeps_the_step_finite():
    llm = _llm()
    out = llm.generate([[5, 6, 7]], SamplingParams(gen_length=8, cfg_scale=100.0, seed=0))[0]
    assert out.finish_reason in ("length", "eos")


# ------------------------------------------------------------------------------------------- AsyncEngine
def _run(coro):
    return asyncio.run(coro)


async def _collect(engine, prompt, params, **kw):
    last = None
    async for item in engine.generate(prompt, params, **kw):
        last = item
    return last


def _wait_idle(engine: AsyncEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine._lock:
            if not engine.engine.has_unfinished() and not engine._pending_aborts:
                return
        time.sleep(0.02)
    raise AssertionError("the engine still has unfinished requests")


def _leave_while_adding(engine: AsyncEngine, reached: threading.Event, release: threading.Event | None,
                        gen_length: int) -> dict:
    """Start a request, cancel its caller once the worker thread that adds it has set ``reached`` (then set
    ``release``), wait until the engine is idle, and return the engine's counts."""
    async def main():
        task = asyncio.ensure_future(_collect(engine, [5, 6, 7], SamplingParams(gen_length=gen_length,
                                                                                   block_length=8)))
        await asyncio.to_thread(reached.wait, 10)
        task.cancel()
        if release is not None:
            release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        _run(main())
        _wait_idle(engine)
        return engine.stats()
    finally:
        engine.shutdown()


def test_async_caller_that_leaves_while_its_request_is_added_leaves_nothing_behind():
    engine = AsyncEngine(_llm().engine)
    entered, release = threading.Event(), threading.Event()
    original = engine._encode

    def slow_encode(prompt):  # the caller leaves while the worker thread still tokenizes
        entered.set()
        release.wait(10)
        return original(prompt)

    engine._encode = slow_encode
    stats = _leave_while_adding(engine, entered, release, gen_length=64)
    assert stats["received"] == stats["finished"] + stats["aborted"] + stats["failed"]


def test_async_caller_that_leaves_just_after_the_add_aborts_its_request():
    engine = AsyncEngine(_llm().engine)
    added = threading.Event()
    original = engine._add

    def add(*args):
        rid = original(*args)
        added.set()
        time.sleep(0.2)  # the caller is cancelled while the worker thread returns
        return rid

    engine._add = add
    stats = _leave_while_adding(engine, added, None, gen_length=256)
    assert stats["received"] == 1 and stats["aborted"] == 1


def test_async_counts_add_up_and_health_follows_failing_steps():
    llm = _llm()
    engine = AsyncEngine(llm.engine)
    expected = _alone(PARAMS, PROMPTS)

    async def main():
        with _faulty_forward(llm, lambda ids: bool((ids == POISON).any())):
            jobs = [_collect(engine, p, q) for p, q in zip(PROMPTS, PARAMS, strict=True)]
            jobs.append(_collect(engine, [1, POISON, 3], SamplingParams(gen_length=8)))
            results = await asyncio.gather(*jobs, return_exceptions=True)
        return results

    try:
        results = _run(main())
        assert isinstance(results[-1], RuntimeError) and "injected kernel fault" in str(results[-1])
        assert [r.output.token_ids for r in results[:-1]] == [o.token_ids for o in expected]
        stats = engine.stats()
        assert stats["received"] == 5 and stats["finished"] == 4 and stats["failed"] == 1
        assert stats["received"] == stats["finished"] + stats["aborted"] + stats["failed"]
        # The last step ran as one batch again: healthy.
        assert engine.healthy

        async def one():
            return await _collect(engine, PROMPTS[0], PARAMS[0])
        with _faulty_forward(llm, lambda ids: True):
            with pytest.raises(RuntimeError):
                _run(one())
            assert not engine.healthy  # steps are failing
        assert _run(one()).output.token_ids == expected[0].token_ids
        assert engine.healthy
    finally:
        engine.shutdown()
