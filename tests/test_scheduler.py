"""The roofline scheduler: admission oldest first (nothing overtakes, nothing starves), every request admitted
while steps are memory-bound, admission held at the knee once they are compute-bound, a step-time bound, and
the same tokens whatever the schedule (batch invariance)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine import EngineConfig
from diffuse_engine.engine.cost_model import CPU, CostModel
from diffuse_engine.engine.scheduler import Scheduler
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

CONFIG = from_name("llada-tiny").config
MODEL = build_model(CONFIG).init_random_(0).eval()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(ceilings=CPU, **config):
    llm = LLM.from_model(MODEL, engine_config=EngineConfig(**config))
    engine = llm.engine
    engine.cost_model = engine.scheduler.cost_model = CostModel(CONFIG, ceilings, 4)
    return llm, engine


def _run(engine, n: int, params: SamplingParams) -> tuple[dict[str, list[int]], int]:
    ids = [engine.add_request(_prompt(8, i), params) for i in range(n)]
    out, peak = {}, 0
    order = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.output.token_ids
        peak = max(peak, len(engine.running))
        order.extend(r.request_id for r in engine.running if r.request_id not in order)
    assert order == ids[: len(order)]  # admitted strictly oldest first
    return out, peak


PARAMS = SamplingParams(gen_length=16, block_length=8, steps=8, seed=0)
MEMORY_BOUND = dataclasses.replace(CPU, peak_tflops=1e6, step_overhead_s=1e-3, layer_overhead_s=0.0,
                                   seq_overhead_s=0.0, cached_seq_overhead_s=0.0)
COMPUTE_BOUND = dataclasses.replace(MEMORY_BOUND, bandwidth_gbs=1e6, peak_tflops=1e-4)


def test_memory_bound_admits_everything_that_fits():
    _, engine = _engine(MEMORY_BOUND)
    _, peak = _run(engine, 12, PARAMS)
    assert peak == 12
    assert engine.last_estimate is not None and engine.last_estimate.regime == "memory"


def test_compute_bound_holds_the_batch_at_the_knee_with_the_same_tokens():
    _, free = _engine(MEMORY_BOUND)
    want, _ = _run(free, 12, PARAMS)
    _, engine = _engine(COMPUTE_BOUND)
    got, peak = _run(engine, 12, PARAMS)
    assert peak < 12 and got == want
    _, fcfs = _engine(COMPUTE_BOUND, scheduling="fcfs")
    _, fcfs_peak = _run(fcfs, 12, PARAMS)
    assert fcfs_peak == 12


def test_step_time_bound():
    _, bounded = _engine(MEMORY_BOUND, max_step_seconds=1e-3 + 1e-9)  # the overhead alone: one request per step
    _, peak = _run(bounded, 4, PARAMS)
    assert peak == 1


def test_head_of_line_request_is_never_overtaken():
    """A request that does not fit yet blocks the ones behind it (no starvation of big requests)."""
    _, engine = _engine(MEMORY_BOUND, max_num_batched_tokens=64)
    small = SamplingParams(gen_length=16, block_length=8, steps=8, seed=0)
    big = SamplingParams(gen_length=48, block_length=8, steps=6, seed=0)
    a = engine.add_request(_prompt(8, 0), small)  # 24 tokens
    b = engine.add_request(_prompt(8, 1), big)  # 56 tokens: waits for a
    c = engine.add_request(_prompt(8, 2), small)  # would fit next to a, but must not overtake b
    engine.step()
    assert [r.request_id for r in engine.running] == [a]
    while any(r.request_id == a for r in engine.running):
        engine.step()
    engine.step()
    assert [r.request_id for r in engine.running][0] == b
    while engine.has_unfinished():
        engine.step()
    assert not engine.waiting and c not in engine._known


def test_bad_scheduler_settings():
    with pytest.raises(ValueError, match="scheduling"):
        EngineConfig(scheduling="lifo")
    with pytest.raises(ValueError, match="max_step_seconds"):
        EngineConfig(max_step_seconds=0)
    with pytest.raises(ValueError, match="cost model"):
        Scheduler(EngineConfig(), None, None, None)
    with pytest.raises(ValueError, match="knee"):
        EngineConfig(scheduling="fcfs", knee=0)


def test_failed_calibration_falls_back_to_a_preset(monkeypatch):
    from diffuse_engine.engine import calibration

    def broken(*args, **kwargs):
        raise RuntimeError("no timer")

    monkeypatch.setattr(calibration, "ceilings_for", broken)
    with pytest.warns(RuntimeWarning, match="CPU preset"):
        llm = LLM.from_model(MODEL)
    assert llm.engine.cost_model.ceilings.name == "CPU"
    with pytest.raises(RuntimeError, match="no timer"):
        LLM.from_model(MODEL, engine_config=EngineConfig(calibrate=True))
