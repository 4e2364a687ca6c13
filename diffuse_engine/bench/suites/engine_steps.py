"""The pieces of the engine suite (:mod:`.engine`): random prompts, the reference loop's tokens, what each step of a
fixed schedule recomputes and reads (hence its floor), and the timing of one configuration (a whole generation or
the steady window of the first block)."""

from __future__ import annotations

import argparse
import time

import torch

from ...entrypoints.llm import LLM
from ...sampling_params import SamplingParams
from .. import reference
from ..common import cache_step_tokens, graphs_option, roofline_seconds, step_cost, sync


def significant(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` significant digits (a tiny model's floor is a few microseconds)."""
    return float(f"{x:.{digits}g}")


def random_prompts(config, batch: int, length: int, seed: int) -> list[list[int]]:
    """``batch`` seeded random prompts of ``length`` tokens, none of them a special token."""
    gen = torch.Generator().manual_seed(seed)
    specials = {config.mask_token_id, config.eos_token_id, config.eot_token_id, config.bos_token_id,
                config.pad_token_id}
    high = min(config.vocab_size, 126000)
    out = []
    for _ in range(batch):
        ids = torch.randint(0, high, (length,), generator=gen).tolist()
        out.append([t if t not in specials else 1 for t in ids])
    return out


def run_reference(model, prompt: list[int], params: SamplingParams, mask_id: int) -> list[int]:
    """The reference loop's generated tokens for one prompt (:mod:`..reference`)."""
    x = torch.tensor([prompt], device=model.device)
    out = reference.llada_generate(model, x, steps=params.steps, gen_length=params.gen_length,
                                   block_length=params.block_length, temperature=0.0, mask_id=mask_id)
    return out[0, len(prompt):].tolist()


def schedule_items(config, params: SamplingParams, prompt_len: int, steps: range) -> list[tuple[int, int, int]]:
    """(tokens recomputed, cached tokens read, LM-head rows) of one sequence at each (0-based) step of a fixed
    schedule: LLaDA's per-block counts (the remainder in the first steps; Dream's differ slightly), head rows =
    positions of the block still masked before the step."""
    spb, bl = params.steps_per_block, params.block_length
    shift = 1 if config.shifted_logits else 0
    items = []
    for n in steps:
        block, s = divmod(n, spb)
        q, ctx = cache_step_tokens(params.cache, prompt_len, params.gen_length, bl, block, s == 0, shift)
        committed = sum(bl // spb + (1 if i < bl % spb else 0) for i in range(s))
        items.append((q, ctx, bl - committed))
    return items


def window_floor(config, items: list[tuple[int, int, int]], batch: int, dtype_bytes: int, ceilings: dict) -> dict:
    """Mean floor per step over ``items`` (one per step, every sequence of the batch alike), its two parts (bytes /
    bandwidth and FLOPs / peak, each a mean per step), and whether the window's bytes or its FLOPs bound it."""
    floors, memory, compute = [], 0.0, 0.0
    for q, ctx, rows in items:
        m, c = roofline_seconds(step_cost(config, [q] * batch, rows * batch, dtype_bytes, [ctx] * batch), ceilings)
        floors.append(max(m, c))
        memory, compute = memory + m, compute + c
    return {"floor_s": sum(floors) / len(floors), "memory_s": memory / len(items), "compute_s": compute / len(items),
            "bound": "memory" if memory >= compute else "compute"}


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams, opts: argparse.Namespace,
            device: torch.device) -> dict:
    """Time one configuration: a whole generation, or the steady window of its first block."""
    if opts.timing == "generation":
        sync(device)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(device)
        seconds = time.perf_counter() - t
        nfe = outs[0].nfe
        return {"seconds": seconds, "nfe": nfe, "steps_timed": range(nfe), "tokens": len(prompts) * params.gen_length,
                "outputs": outs}
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    try:
        first = engine.step()
        if len(first) != len(prompts):
            raise RuntimeError(f"only {len(first)} of {len(prompts)} requests ran in the first step.")
        for _ in range(opts.warmup_steps - 1):
            engine.step()
        sync(device)
        t = time.perf_counter()
        for _ in range(opts.timed_steps):
            engine.step()
        sync(device)
        seconds = time.perf_counter() - t
    finally:
        for rid in ids:
            engine.abort(rid)
    tps = params.gen_length // params.steps
    return {"seconds": seconds, "nfe": None, "tokens": len(prompts) * tps * opts.timed_steps,
            "steps_timed": range(opts.warmup_steps, opts.warmup_steps + opts.timed_steps), "outputs": None}


def configurations(opts: argparse.Namespace, device: torch.device):
    """(gen_length, cache, graphs, batch, tokens per step) to run, and the notes on those skipped."""
    graphs_list = opts.graphs or [None]
    todo, notes = [], []
    for gen_length in opts.gen_lengths:
        for cache in opts.caches:
            for graphs in graphs_list:
                if graphs == "on" and cache == "none":
                    notes.append("cache none with graphs on: not run (CUDA graphs replay only cached steps).")
                    continue
                if graphs == "on" and device.type != "cuda":
                    notes.append(f"graphs on: skipped, CUDA graphs need a CUDA device (here {device}).")
                    continue
                if graphs == "on" and not graphs_option():
                    notes.append("graphs on: skipped, this engine has no EngineConfig.cuda_graphs option.")
                    continue
                for batch in opts.batches:
                    for tps in opts.tokens_per_step:
                        todo.append((gen_length, cache, graphs, batch, tps))
    return todo, list(dict.fromkeys(notes))


def check_window(opts: argparse.Namespace, params: SamplingParams, cache: str) -> None:
    """A steady window must lie inside the first block, past the steps that refresh, run eagerly and capture."""
    if opts.timing != "steady":
        return
    if opts.warmup_steps + opts.timed_steps > params.steps_per_block:
        raise ValueError(f"--warmup-steps + --timed-steps ({opts.warmup_steps + opts.timed_steps}) must fit "
                         f"in the first block's {params.steps_per_block} steps (block_length / tokens "
                         f"per step) so that every timed step is a steady one.")
    if cache != "none" and opts.warmup_steps < 3:
        raise ValueError("with a cache, --warmup-steps must be at least 3: the block's first step "
                         "recomputes the whole sequence, the next runs eagerly, the third captures the "
                         "CUDA graphs.")
