"""The step lives on the device (DESIGN.md section 2): what the host does per step must not grow with the batch or
the block, plans are reused while nothing changes phase, and a batch padded to a CUDA-graph bucket decodes exactly
as the batch itself.

On the CPU, device values and host values are the same tensors, so "the host reads the device" is counted as
tensor-to-Python conversions (``item``, ``tolist``, ``cpu``, ``__bool__``, ``__int__``, ``__float__``,
``__index__``) inside ``Engine.step``. On a GPU each of them would be a synchronisation; the GPU twin of this test
runs whole generations under ``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu_engine.py).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.engine import EngineConfig
from diffuse_engine.engine import graphs as graphs_mod
from diffuse_engine.engine import plan as plan_mod
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

CONVERSIONS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__")


@functools.cache
def _model(preset: str, dtype: torch.dtype = torch.float32):
    return build_model(from_name(preset).config, dtype=dtype).init_random_(0).eval()


@contextlib.contextmanager
def _count_conversions(engine):
    """Counts conversions per ``engine.step()`` call (a list, one entry per step)."""
    per_step: list[int] = []
    active = [False]
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if active[0]:
                per_step[-1] += 1
            return original(self, *args, **kwargs)
        return wrapper

    step = engine.step

    def counted_step():
        per_step.append(0)
        active[0] = True
        try:
            return step()
        finally:
            active[0] = False

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counting(name))
    engine.step = counted_step
    try:
        yield per_step
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        del engine.step


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, 256, (3 + 5 * i % 17,), generator=g).tolist() for i in range(n)]


def _conversions(preset: str, batch: int, block: int, **kw) -> list[int]:
    llm = LLM.from_model(_model(preset))
    params = SamplingParams(gen_length=2 * block, block_length=block, steps=block, seed=1, **kw)
    with _count_conversions(llm.engine) as per_step:
        outs = llm.generate(_prompts(batch), params)
    assert all(len(o.token_ids) == 2 * block for o in outs)
    return per_step


SETTINGS = [
    ("llada-tiny", {}),
    ("llada-tiny", dict(cache="dual", policy="threshold", threshold=0.5)),
    ("llada-tiny", dict(cache="prefix", temperature=0.8, remasking="random")),
    ("dream-tiny", dict(remasking="origin", temperature=0.5)),
    ("dream-tiny", dict(remasking="topk_margin", alg_temp=0.5, top_p=0.9)),
    ("llada-tiny", dict(revision="remdm", remdm_variant="conf", remdm_eta=0.5)),
    ("llada-tiny", dict(policy="threshold", threshold=0.2, revision="wino", cache="dual")),
    ("llada-tiny", dict(cfg_scale=1.0, early_stop=True, stop=None)),
    ("sdar-tiny", {}),
]


@pytest.mark.parametrize("preset,kw", SETTINGS, ids=[f"{p}-{'-'.join(k) or 'plain'}" for p, k in SETTINGS])
def test_host_reads_per_step_do_not_grow_with_batch_or_block(preset, kw):
    block = from_name(preset).config.block_size or 8
    small = _conversions(preset, 1, block, **kw)
    wide = _conversions(preset, 8, block, **kw)
    assert max(wide) == max(small), (small, wide)
    if from_name(preset).config.block_size is None:
        longer = _conversions(preset, 1, 4 * block, **kw)
        assert max(longer) == max(small), (small, longer)
    assert max(small) <= 2  # at most the commit op's mode check on CPU tensors, and nothing per request


def test_a_plan_is_reused_while_no_request_changes_phase(monkeypatch):
    builds = []
    original = plan_mod.build_plan

    def spy(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    import diffuse_engine.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "build_plan", spy)
    llm = LLM.from_model(_model("llada-tiny"))
    # 4 blocks of 8 steps each, dual cache: a refresh plan and a steady plan per block
    out = llm.generate(_prompts(4), SamplingParams(gen_length=32, block_length=8, steps=32, cache="dual", seed=0))
    assert out[0].nfe == 32
    assert len(builds) == 2 * 4
    builds.clear()
    llm.generate(_prompts(4), SamplingParams(gen_length=32, block_length=8, steps=32, seed=0))
    assert len(builds) == 4  # no cache: one plan per block


def test_one_copy_back_per_step(monkeypatch):
    llm = LLM.from_model(_model("llada-tiny"))
    engine = llm.engine
    fetches = []
    original = engine._fetch
    monkeypatch.setattr(engine, "_fetch", lambda result: fetches.append(result.numel()) or original(result))
    steps = []
    llm.generate(_prompts(3), SamplingParams(gen_length=16, block_length=8, steps=8, cache="dual", seed=0),
                 on_step=steps.append)
    assert len(fetches) == len(steps) == 8


def test_cuda_graphs_refused_on_cpu():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        LLM.from_model(_model("llada-tiny"), engine_config=EngineConfig(cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        EngineConfig(cuda_graphs="yes")
    llm = LLM.from_model(_model("llada-tiny"), engine_config=EngineConfig(cuda_graphs=None))
    assert not llm.engine.runner.graphs.enabled


@pytest.mark.parametrize("preset,kw", [
    ("llada-tiny", dict(cache="dual", temperature=0.7)),
    ("llada-tiny", dict(cache="dual", policy="threshold", threshold=0.3, remasking="random", temperature=0.5)),
    ("dream-tiny", dict(cache="dual", remasking="entropy")),
    ("sdar-tiny", dict(temperature=0.6)),
])
def test_a_batch_padded_to_its_graph_bucket_decodes_as_itself(monkeypatch, backend_env, preset, kw):
    """The CUDA-graph path of the runner (keys, the padded warm-up step, loading plans into the static tensors,
    replays, cutting results back), with a capture that records nothing and a replay that runs the static plan's
    step: the plan padded to its bucket (padding requests read no cache, own no cell, commit nothing), here through
    the Triton cached-block kernel under the interpreter, as on a GPU, gives the tokens of the unpadded batch."""
    backend_env("DIFFUSE_ATTENTION_BACKEND", "triton")
    model = _model(preset)
    block = model.config.block_size or 8
    gen = 4 * block if model.config.block_size else block  # one steady step per block: 3 blocks reach the capture
    params = SamplingParams(gen_length=gen, block_length=block, steps=gen // 2, seed=3, **kw)
    prompts = _prompts(3)  # bucket 4: one padding request
    if model.config.block_size:  # whole prompt blocks: the three requests step through their blocks in lockstep
        prompts = [list(range(20 + i, 20 + i + block * (i + 1))) for i in range(3)]
    want = [o.token_ids for o in LLM.from_model(model).generate(prompts, params)]

    llm = LLM.from_model(model)
    graphs = llm.engine.runner.graphs
    graphs.enabled = True  # on the CPU: every step of the graph path but the capture itself
    replayed = []

    def capture(static, store, plan):
        """Stands in for a CUDA graph capture (which records, not runs): its replay runs the static plan's step."""
        graph = graphs_mod._Graph(None, static, None, plan)

        class Replay:
            def replay(self):
                replayed.append(static.batch)
                graph.out = graphs.runner.eager(static, store)

        graph.graph = Replay()
        graphs.captures += 1
        return graph

    monkeypatch.setattr(graphs, "_capture", capture)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert graphs.captures >= 1 and replayed and max(replayed) == 4


def test_a_request_with_non_finite_logits_fails_alone():
    """A prompt token whose embedding is NaN poisons its own sequence only: that request finishes with
    finish_reason "error" and a message; the others decode exactly as alone, and the engine keeps serving."""
    model = build_model(from_name("llada-tiny").config, dtype=torch.float32).init_random_(0).eval()
    poison = 77
    with torch.no_grad():
        model.model.transformer.wte.weight[poison] = float("nan")
    llm = LLM.from_model(model)
    params = SamplingParams(gen_length=16, block_length=8, steps=8, seed=2)
    clean = [[5, 6, 7], [40, 41, 42, 43]]
    alone = [llm.generate([p], params)[0].token_ids for p in clean]
    outs = llm.generate([clean[0], [1, poison, 3], clean[1]], params)
    assert outs[1].finish_reason == "error" and "not finite" in outs[1].error
    assert outs[1].nfe == 1 and outs[0].error is None
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert not llm.engine.has_unfinished() and llm.engine.store.num_free_slots == llm.engine.config.max_num_seqs
    assert llm.generate([clean[0]], params)[0].token_ids == alone[0]


def test_a_block_diffusion_sequence_may_run_past_the_model_length():
    """Its last block is whole: the sequence ends past max_position_embeddings, and its slot holds it."""
    import dataclasses

    cfg = dataclasses.replace(from_name("sdar-tiny").config, max_position_embeddings=30)
    llm = LLM.from_model(build_model(cfg, dtype=torch.float32).init_random_(1).eval())
    out = llm.generate([list(range(10, 20))], SamplingParams(gen_length=20, block_length=4, steps=10, seed=0))[0]
    assert len(out.token_ids) == 20 and llm.engine.store.capacity >= 32


def test_the_canvas_store_grows_without_losing_running_requests():
    """A longer request reallocates the slots (a new generation: plans and graphs built before are stale); the
    running requests' tokens, on the device and in the host mirror their ``seq`` views, are kept."""
    from diffuse_engine.engine.canvas import CanvasStore
    from diffuse_engine.engine.request import Request

    store = CanvasStore(3, 64, torch.device("cpu"), mask_id=9, initial_capacity=4)
    params = SamplingParams(gen_length=2, block_length=2, steps=2)
    a = Request("a", [1, 2], params, "low_confidence", 0, 9, "llada")
    store.admit(a)
    a.seq[2] = 5
    store.tokens[a.slot * store.capacity + 2] = 5
    generation = store.generation
    b = Request("b", list(range(10, 20)), params, "low_confidence", 0, 9, "llada")
    store.admit(b)
    assert store.generation == generation + 1 and store.capacity == 16
    assert a.seq.tolist() == [1, 2, 5, 9] and b.seq.tolist() == list(range(10, 20)) + [9, 9]
    for r in (a, b):
        base = r.slot * store.capacity
        assert store.tokens[base:base + r.seq_len].tolist() == r.seq.tolist()
    store.release(a)
    assert a.seq.tolist() == [1, 2, 5, 9] and store.num_free_slots == 2
