"""The tensor-parallel suite: the step time of a model sharded over N ranks against the same model on one rank, in
the same run on the same machine, and the share of the step spent in the ranks' collectives.

``diffuse-engine bench tensor-parallel``: a random-weight preset (``--preset``, default llada-small; ``--quick``:
llada-tiny) written to a temporary folder, or ``--model``'s checkpoint; ``--tensor-parallel-size N`` (default 2) ranks
on the device (N GPUs, or N CPU processes with gloo). For each batch (``--batches``; default 1 and 8, on CUDA 1 and
32) the engine decodes fixed-schedule requests without a cache; after ``--warmup-steps`` untimed steps, the mean of
``--timed-steps`` steps is the step time (the engine suite's steady timing). ``collective_ms`` is rank 0's wall
time inside all-reduces and all-gathers per step, averaged over the warm-up and timed steps (on the CPU; on CUDA the
host only enqueues them, so the column to read is the cost model's estimate with the link measured at start-up:
``comm_model_ms``). On a 2-core CPU the ranks share the cores: the row shows the overhead of tensor parallelism, not
a speedup. Rows go to ``<out>/tensor_parallel.csv``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ...checkpoint import write_random_checkpoint
from ...engine import EngineConfig
from ...entrypoints.llm import LLM
from ...presets import from_name
from ...sampling_params import SamplingParams
from ..common import append_csv, stamp
from .engine_steps import measure, random_prompts
from .options import given, resolve_device, resolve_dtype

COLUMNS = ["preset", "tp", "batch", "step_ms", "vs_tp1", "collective_ms", "collective_share", "comm_model_ms",
           "link_gbs", "link_latency_us"]
KEYS = {"tensor_parallel.csv": (("preset", "dtype", "tp", "batch", "gen_length", "prompt_len"), "step_ms")}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    device = resolve_device(args.device)
    quick = bool(args.quick)
    size = getattr(args, "tensor_parallel_size", None) or 2
    if size < 2:
        raise ValueError(f"--tensor-parallel-size must be at least 2 for this suite; got {size}.")
    opts = argparse.Namespace(
        preset=args.preset or ("llada-tiny" if quick else "llada-small"), model=getattr(args, "model", None),
        device=device, dtype=resolve_dtype(args.dtype, device), size=size,
        batches=[1, 8] if device.type != "cuda" else [1, 32], gen_length=32 if quick else 64, prompt_len=16,
        warmup_steps=2 if quick else 4, timed_steps=4 if quick else 12, seed=0)
    for name in ("batches", "warmup_steps", "timed_steps", "seed", "prompt_len"):
        setattr(opts, name, given(args, name, getattr(opts, name)))
    if not opts.model:
        from_name(opts.preset)
    return opts


def _step_ms(llm: LLM, batch: int, opts) -> tuple[float, float]:
    """Mean step time (ms) of ``batch`` fixed-schedule requests (the engine suite's steady timing), and rank 0's
    collective time per step (ms; averaged over the warm-up and the timed steps)."""
    params = SamplingParams(gen_length=opts.gen_length, steps=opts.gen_length, seed=opts.seed)
    prompts = random_prompts(llm.config, batch, opts.prompt_len, opts.seed)
    channel = llm.model.tp.channel if llm.model.tp is not None else None
    before = channel.collective_seconds if channel is not None else 0.0
    timing = argparse.Namespace(timing="steady", warmup_steps=opts.warmup_steps, timed_steps=opts.timed_steps)
    seconds = measure(llm, prompts, params, timing, opts.device)["seconds"] / opts.timed_steps
    spent = channel.collective_seconds - before if channel is not None else 0.0
    return seconds * 1e3, spent / (opts.warmup_steps + opts.timed_steps) * 1e3


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    opts = settings(args)
    with tempfile.TemporaryDirectory(prefix="diffuse-tp-") as tmp:
        folder = opts.model or write_random_checkpoint(Path(tmp) / opts.preset, opts.preset, seed=opts.seed,
                                                       dtype=opts.dtype)
        times: dict[tuple[int, int], float] = {}
        rows = []
        for tp in (1, opts.size):
            config = EngineConfig(max_num_seqs=max(opts.batches), tensor_parallel_size=tp)
            with LLM(folder, device=str(opts.device), dtype=opts.dtype, engine_config=config) as llm:
                link = llm.model.tp.link if llm.model.tp is not None else None
                for batch in opts.batches:
                    step_ms, coll_ms = _step_ms(llm, batch, opts)
                    times[(tp, batch)] = step_ms
                    est = llm.engine.cost_model.predict([(opts.prompt_len + opts.gen_length, 0, opts.gen_length)]
                                                        * batch)
                    rows.append({**stamp(opts.device), "preset": opts.preset, "dtype": opts.dtype, "tp": tp,
                                 "batch": batch, "gen_length": opts.gen_length, "prompt_len": opts.prompt_len,
                                 "step_ms": round(step_ms, 3),
                                 "vs_tp1": round(step_ms / times[(1, batch)], 3),
                                 "collective_ms": round(coll_ms, 3) if opts.device.type != "cuda" else "",
                                 "collective_share": round(coll_ms / step_ms, 3) if opts.device.type != "cuda" else "",
                                 "comm_model_ms": round(est.phases.get("comm", 0.0) * 1e3, 3),
                                 "link_gbs": round(link.bandwidth_gbs, 3) if link else "",
                                 "link_latency_us": round(link.latency_s * 1e6, 1) if link else "",
                                 "threads": torch.get_num_threads()})
    append_csv(out / "tensor_parallel.csv", rows)
    return rows
