"""The Engine's request life cycle (add_request / step / abort / has_unfinished), its step outputs, early stop,
seeds, and LLM.generate / LLM.chat on a real model folder with a tokenizer."""

from __future__ import annotations

import pytest
import torch

from diffuse_engine import LLM, Engine, EngineConfig, SamplingParams
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.models import build_model
from diffuse_engine.presets import from_name

CONFIG = from_name("llada-tiny").config


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG).init_random_(0)


def _eos_heavy(model, boost: float = 1.5):
    """A copy of ``model`` whose LM head favours EOS at some positions: EOS's row becomes a scaled copy of the
    most frequent prediction's row, so answers end early."""
    heavy = build_model(CONFIG)
    heavy.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = torch.tensor([[1, 2, 3] + [CONFIG.mask_token_id] * 32])
        top = heavy(x)[0, 3:].argmax(-1).bincount().argmax()
        head = heavy.lm_head_weight()
        head[CONFIG.eos_token_id] = head[top] * boost
    return heavy


def test_one_forward_per_step_for_a_mixed_batch(model):
    engine = Engine(model)
    params = [SamplingParams(gen_length=16, block_length=8, steps=8),
              SamplingParams(gen_length=32, block_length=16, steps=8, remasking="random", seed=1),
              SamplingParams(gen_length=8, steps=8, temperature=0.9, seed=2)]
    prompts = [[5], list(range(10, 40)), [7, 8, 9]]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    seen: dict[str, list] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert engine.num_steps == 8  # every request needs 8 steps; they ran together, one forward each
    for rid, sp in zip(ids, params, strict=True):
        steps = seen[rid]
        assert [s.step for s in steps] == list(range(sp.steps))
        assert steps[-1].finished and steps[-1].output.nfe == sp.steps
        # LLaDA schedule: per block, masked // steps per step with the remainder first
        per_block = sp.block_length // sp.steps_per_block
        assert all(len(s.committed) == per_block for s in steps)
        canvas = steps[-1].canvas
        assert CONFIG.mask_token_id not in canvas and canvas == steps[-1].output.token_ids
        # committed pairs rebuild the final canvas, and each step's canvas shows exactly what was committed
        rebuilt = [CONFIG.mask_token_id] * sp.gen_length
        for s in steps:
            for pos, tok in s.committed:
                assert rebuilt[pos] == CONFIG.mask_token_id
                rebuilt[pos] = tok
            assert s.canvas == rebuilt
    assert not engine.has_unfinished()


def test_abort_frees_the_request_and_others_continue(model):
    engine = Engine(model)
    a = engine.add_request([1, 2, 3], SamplingParams(gen_length=16, steps=16))
    b = engine.add_request([4, 5], SamplingParams(gen_length=16, steps=16), request_id="keep")
    engine.step()
    assert engine.abort(a) is True
    assert engine.abort(a) is False and engine.abort("never-seen") is False
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs} == {b}
    alone = LLM.from_model(model).generate([[4, 5]], SamplingParams(gen_length=16, steps=16))[0]
    assert [o for o in outs if o.finished][0].output.token_ids == alone.token_ids
    engine.add_request([1], SamplingParams(gen_length=8), request_id=a)  # an aborted id can be reused


def test_duplicate_request_id_is_rejected(model):
    engine = Engine(model)
    engine.add_request([1, 2], SamplingParams(gen_length=8), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(gen_length=8), request_id="x")


def test_batch_limits_queue_requests(model):
    engine = Engine(model, config=EngineConfig(max_num_seqs=2))
    for i in range(5):
        engine.add_request([1 + i], SamplingParams(gen_length=8, steps=4))
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 3
    done = 0
    while engine.has_unfinished():
        done += sum(o.finished for o in engine.step())
    assert done == 5
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        small = Engine(model, config=EngineConfig(max_num_batched_tokens=16))
        small.add_request([1] * 10, SamplingParams(gen_length=8))
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_early_stop_saves_the_remaining_blocks(model):
    heavy = _eos_heavy(model)
    llm = LLM.from_model(heavy)
    base = dict(gen_length=64, block_length=8, steps=32)
    full = llm.generate([[1, 2, 3]], SamplingParams(**base))[0]
    early = llm.generate([[1, 2, 3]], SamplingParams(**base, early_stop=True))[0]
    eos_at = full.token_ids.index(CONFIG.eos_token_id)
    block_end = (eos_at // 8 + 1) * 8
    assert block_end < 64, "the EOS-heavy model must end its answer before the last block"
    assert early.nfe == (block_end // 8) * 4 < full.nfe
    assert early.token_ids[:block_end] == full.token_ids[:block_end]
    assert early.token_ids[block_end:] == [CONFIG.eos_token_id] * (64 - block_end)
    assert early.finish_reason == "eos"


def test_seed_is_reported_and_reproduces(model):
    llm = LLM.from_model(model)
    params = SamplingParams(gen_length=16, steps=8, temperature=1.0)
    first = llm.generate([[3, 4]], params)[0]
    again = llm.generate([[3, 4]], SamplingParams(gen_length=16, steps=8, temperature=1.0, seed=first.seed))[0]
    assert again.token_ids == first.token_ids
    other = llm.generate([[3, 4]], SamplingParams(gen_length=16, steps=8, temperature=1.0, seed=first.seed + 1))[0]
    assert other.token_ids != first.token_ids
    big = SamplingParams(gen_length=16, steps=8, temperature=1.0, seed=2 ** 64 - 1)
    assert llm.generate([[3, 4]], big)[0].seed == 2 ** 64 - 1


def test_text_is_the_answer_up_to_eos(tmp_path, model):
    folder = write_random_checkpoint(tmp_path / "m", "llada-tiny", seed=0)
    llm = LLM(folder, device="cpu")
    heavy = _eos_heavy(llm.model)
    llm = LLM.from_model(heavy, llm.tokenizer)
    out = llm.generate("Hi", SamplingParams(gen_length=32, block_length=8, steps=16))[0]
    cut = out.token_ids.index(CONFIG.eos_token_id)
    assert out.finish_reason == "eos"
    assert out.text == llm.tokenizer.decode(out.token_ids[:cut])
    assert out.prompt_token_ids == llm.tokenizer.encode("Hi")
    assert out.metrics.latency is not None and out.metrics.latency >= 0
    assert out.tokens_per_forward == 2.0


def test_chat_applies_the_template(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m", "dream-tiny", seed=0)
    llm = LLM(folder, device="cpu")
    conv = [{"role": "user", "content": "2+2?"}]
    out = llm.chat(conv, SamplingParams(gen_length=16, steps=8))[0]
    text = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.tokenizer.encode(text)
    assert llm.generate(text, SamplingParams(gen_length=16, steps=8))[0].token_ids == out.token_ids


def test_weights_only_model_needs_token_ids(model):
    llm = LLM.from_model(model)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("text without a tokenizer", SamplingParams(gen_length=8))
    with pytest.raises(ValueError, match="takes token ids"):
        Engine(model).add_request("text", SamplingParams(gen_length=8))


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
def test_half_precision_on_cpu(preset, dtype, tolerance):
    """The low-precision dtypes run end to end on the CPU, and their logits stay within the dtype's rounding
    of fp32 (bf16 keeps 8 mantissa bits, fp16 11: relative errors of a few 1e-3 per op, compounded over two
    layers). Whole trajectories are not compared: one flipped near-tie changes every later step."""
    config = from_name(preset).config
    fp32 = build_model(config).init_random_(3)
    half = build_model(config, dtype=dtype)
    half.load_state_dict(fp32.state_dict())
    ids = torch.tensor([[1, 2, 3, 4] + [config.mask_token_id] * 28])
    want, got = fp32(ids), half(ids).float()
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    params = SamplingParams(gen_length=32, block_length=16, steps=16, temperature=0.7, seed=5)
    out = LLM.from_model(half).generate([[1, 2, 3, 4]], params)[0]
    assert len(out.token_ids) == 32 and out.nfe == 16
    assert LLM.from_model(half).generate([[1, 2, 3, 4]], params)[0].token_ids == out.token_ids


@pytest.mark.parametrize("preset", ["llada-tiny", "dream-tiny"])
def test_model_that_predicts_mask_follows_the_published_loops(preset):
    """A random model can predict [MASK] itself; the committed position then stays masked. The published loops
    offer it again (LLaDA scores every masked position before the block's end; Dream has one block), and so
    does the engine: tokens equal the oracles'."""
    from oracles import dream_generate, llada_generate

    config = from_name(preset).config
    model = build_model(config, dtype=torch.float64).init_random_(0)
    with torch.no_grad():
        x = torch.tensor([[1, 2, 3] + [config.mask_token_id] * 32])
        top = model(x)[0, 3:].argmax(-1).bincount().argmax()
        head = model.lm_head_weight()
        head[config.mask_token_id] = head[top] * 1.2
    prompt = [1, 2, 3]
    if preset == "llada-tiny":
        params = SamplingParams(gen_length=32, block_length=8, steps=16)
        want = llada_generate(model, torch.tensor([prompt]), steps=16, gen_length=32, block_length=8,
                              mask_id=config.mask_token_id)
    else:
        params = SamplingParams(gen_length=32, steps=16)
        want = dream_generate(model, torch.tensor([prompt]), 32, 16, mask_id=config.mask_token_id)
    got = LLM.from_model(model).generate([prompt], params)[0].token_ids
    assert config.mask_token_id in want[0].tolist(), "the model must commit [MASK] at least once"
    assert got == want[0, len(prompt):].tolist()
