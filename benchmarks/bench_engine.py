"""End-to-end engine benchmark: tokens/s, NFE and tokens per forward of the engine against the reference loop
(LLaDA's published ``generate()``, re-expressed in tests/oracles.py), same device, same model, one run, with a
check that both produce identical tokens; and steady-state step times per KV-cache mode and CUDA-graph setting.

CPU (the default): a LLaDA-shaped random model (preset ``llada-small``: LLaDA's 126464-token vocabulary,
34.5M parameters), gen_length 128 and 256, block 32, one token per step.
GPU: ``--preset llada-8b --device cuda --dtype bfloat16 --init on-device --tokens-per-step 1,2,4,8`` measures
step time against the floor max(bytes / bandwidth, FLOPs / peak) with the device's measured ceilings
(``--ceilings``): bytes are the weights plus the cached K/V a step reads, FLOPs 2 x parameters x tokens
recomputed plus attention (``common.step_cost``; what each cache mode recomputes: ``common.cache_step_tokens``).

Two timings (``--timing``):
- ``generation`` (default): whole generations through ``LLM.generate``; ``step_ms`` = time / NFE, the floor is
  the mean over the generation's steps (a cached block's first step recomputes the whole sequence).
- ``steady``: ``--warmup-steps`` W engine steps (with a cache: the block's first step, which recomputes the whole
  sequence, an eager cached step and the CUDA-graph capture, so W >= 3; JIT compilation), then
  ``--timed-steps`` K steps timed together, all inside the first block and past its first step: the cost
  of a cached step alone, affordable at large batches without a cache. ``engine_tok_s`` is then committed tokens
  per second in that window. With ``--cache prefix``, a first-block step recomputes the whole canvas (the most
  a prefix step ever recomputes); ``query_tokens`` / ``context_tokens`` say what was counted.
Schedules are fixed (``policy="fixed"``, ``--tokens-per-step`` per step): random weights make confidences
meaningless. Every configuration runs all its requests in one batch (``EngineConfig(scheduling="fcfs")``, a KV
cache sized for them), so ``batch`` is the batch of every step.

``--caches none,prefix,dual`` (``SamplingParams.cache``) and ``--graphs on,off``
(``EngineConfig.cuda_graphs=True|False``; not given: the engine's default, column ``cuda_graphs`` = default) add
those dimensions. CUDA graphs replay only cached steps (in the engine today: dual-cache steps; a prefix row with
graphs on shows whether its steps gain), so cache ``none`` runs with graphs ``off`` only (an ``on`` row would
repeat it). An engine without the ``cuda_graphs`` option runs ``off`` as its default and skips ``on``, as does a
CPU device. A configuration that fails is reported and the others still run (exit status 1).

    python benchmarks/bench_engine.py                       # CPU, writes ./bench-results/engine_cpu.csv
    python benchmarks/bench_engine.py --quick               # seconds; what CI runs
    python benchmarks/bench_engine.py --preset llada-8b --device cuda --init on-device --ceilings --timing steady \\
        --caches none,prefix,dual --graphs on,off --batches 1,8,32,64 --prompt-len 64 --gen-lengths 256 --out X.csv
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from diffuse_engine.bench.common import (  # noqa: E402
    OUT,
    append_csv,
    cache_step_tokens,
    engine_config,
    graphs_option,
    measure_ceilings,
    print_table,
    roofline_seconds,
    stamp,
    step_cost,
    sync,
)

from diffuse_engine import LLM, SamplingParams  # noqa: E402
from diffuse_engine.models import build_model  # noqa: E402
from diffuse_engine.presets import from_name  # noqa: E402

EXTRA_COLUMNS = ("floor_ms", "pct_of_floor", "bound", "reference_s", "reference_tok_s", "speedup", "identical_tokens")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHES = ("none", "prefix", "dual")
GRAPHS = ("on", "off")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def names(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return out
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llada-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--init", default="cpu", choices=["cpu", "on-device"], help="where random weights are drawn")
    ap.add_argument("--gen-lengths", type=ints, default=[128, 256])
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=ints, default=[1])
    ap.add_argument("--tokens-per-step", type=ints, default=[1])
    ap.add_argument("--caches", type=names(CACHES), default=["none"], help="KV-cache modes, e.g. none,prefix,dual")
    ap.add_argument("--graphs", type=names(GRAPHS), default=None,
                    help="CUDA graphs on,off (EngineConfig.cuda_graphs); default: the engine's default")
    ap.add_argument("--timing", default="generation", choices=["generation", "steady"])
    ap.add_argument("--warmup-steps", type=int, default=4, help="steady timing: untimed steps first")
    ap.add_argument("--timed-steps", type=int, default=8, help="steady timing: steps timed")
    ap.add_argument("--reference", default="on", choices=["on", "off"],
                    help="also run the reference loop (batch 1 generation rows only) and compare tokens")
    ap.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and matmul rate for the floor")
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths (CI smoke run)")
    ap.add_argument("--out", type=Path, default=None, help=f"CSV to append to (default {OUT}/engine_<device>.csv)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.gen_lengths, args.block_length, args.prompt_len = "llada-tiny", [32], 16, 8
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.warmup_steps < 1 or args.timed_steps < 1:
        ap.error("--warmup-steps and --timed-steps must be at least 1.")
    return args


def significant(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` significant digits (a tiny model's floor is a few microseconds)."""
    return float(f"{x:.{digits}g}")


def random_prompts(config, batch: int, length: int, seed: int) -> list[list[int]]:
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
    from oracles import llada_generate

    x = torch.tensor([prompt], device=model.device)
    out = llada_generate(model, x, steps=params.steps, gen_length=params.gen_length,
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
    """Mean floor per step over ``items`` (one per step, every sequence of the batch alike), and whether the
    window's bytes or its FLOPs bound it."""
    floors, memory, compute = [], 0.0, 0.0
    for q, ctx, rows in items:
        m, c = roofline_seconds(step_cost(config, [q] * batch, rows * batch, dtype_bytes, [ctx] * batch), ceilings)
        floors.append(max(m, c))
        memory, compute = memory + m, compute + c
    return {"floor_s": sum(floors) / len(floors), "bound": "memory" if memory >= compute else "compute"}


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams, args, device: torch.device) -> dict:
    """Time one configuration: a whole generation, or the steady window of its first block."""
    if args.timing == "generation":
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
        for _ in range(args.warmup_steps - 1):
            engine.step()
        sync(device)
        t = time.perf_counter()
        for _ in range(args.timed_steps):
            engine.step()
        sync(device)
        seconds = time.perf_counter() - t
    finally:
        for rid in ids:
            engine.abort(rid)
    tps = params.gen_length // params.steps
    return {"seconds": seconds, "nfe": None, "tokens": len(prompts) * tps * args.timed_steps,
            "steps_timed": range(args.warmup_steps, args.warmup_steps + args.timed_steps), "outputs": None}


def configurations(args, device: torch.device):
    """(gen_length, cache, graphs, batch, tokens per step) to run, and the notes on those skipped."""
    graphs_list = args.graphs or [None]
    todo, notes = [], []
    for gen_length in args.gen_lengths:
        for cache in args.caches:
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
                for batch in args.batches:
                    for tps in args.tokens_per_step:
                        todo.append((gen_length, cache, graphs, batch, tps))
    return todo, list(dict.fromkeys(notes))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    preset = from_name(args.preset)
    config = preset.config
    dtype = DTYPES[args.dtype]
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    t0 = time.perf_counter()
    model = build_model(config, device=device, dtype=dtype).init_random_(args.seed, on_device=args.init == "on-device")
    print(f"# {args.preset}: {config.num_parameters() / 1e6:.1f}M parameters, {args.dtype} on {device}, "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    ceilings = measure_ceilings(device) if args.ceilings else None
    if ceilings:
        print(f"# ceilings: copy {ceilings['bandwidth_gbs']:.0f} GB/s, matmul {ceilings['peak_tflops']:.1f} TFLOP/s "
              f"({ceilings['matmul_dtype']})", flush=True)
    todo, notes = configurations(args, device)
    for note in notes:
        print(f"# {note}", flush=True)
    # warm-up: kernels, allocator
    LLM.from_model(model, engine_config=engine_config(1, args.prompt_len + args.block_length, None)).generate(
        random_prompts(config, 1, args.prompt_len, 99),
        SamplingParams(gen_length=args.block_length, block_length=args.block_length, steps=2))
    base = stamp(device)
    out = args.out or (None if args.quick else OUT / f"engine_{device.type}.csv")
    rows, failures = [], []
    for gen_length, cache, graphs, batch, tps in todo:
        label = f"gen {gen_length} cache {cache} graphs {graphs or 'default'} batch {batch} tokens/step {tps}"
        llm = None
        try:
            steps = gen_length // tps
            params = SamplingParams(gen_length=gen_length, block_length=args.block_length, steps=steps, cache=cache)
            if args.timing == "steady" and args.warmup_steps + args.timed_steps > params.steps_per_block:
                raise ValueError(f"--warmup-steps + --timed-steps ({args.warmup_steps + args.timed_steps}) must fit "
                                 f"in the first block's {params.steps_per_block} steps (block_length / tokens "
                                 f"per step) so that every timed step is a steady one.")
            if args.timing == "steady" and cache != "none" and args.warmup_steps < 3:
                raise ValueError("with a cache, --warmup-steps must be at least 3: the block's first step "
                                 "recomputes the whole sequence, the next runs eagerly, the third captures the "
                                 "CUDA graphs.")
            prompts = random_prompts(config, batch, args.prompt_len, args.seed + batch)
            llm = LLM.from_model(model, engine_config=engine_config(batch, args.prompt_len + gen_length, graphs))
            m = measure(llm, prompts, params, args, device)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not cost the others
            print(f"FAILED {label}: {type(exc).__name__}: {exc}", flush=True)
            failures.append(label)
            continue
        finally:
            del llm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        timed_steps = len(m["steps_timed"])
        items = schedule_items(config, params, args.prompt_len, m["steps_timed"])
        row = {**base, "preset": args.preset, "dtype": args.dtype, "batch": batch, "cache": cache,
               "cuda_graphs": graphs or "default", "timing": args.timing, "prompt_len": args.prompt_len,
               "gen_length": gen_length, "block_length": args.block_length, "steps": steps, "tokens_per_step": tps,
               "warmup_steps": args.warmup_steps if args.timing == "steady" else 0, "timed_steps": timed_steps,
               "nfe": m["nfe"], "tokens_per_forward": round(gen_length / m["nfe"], 3) if m["nfe"] else tps,
               "engine_s": round(m["seconds"], 4), "engine_tok_s": round(m["tokens"] / m["seconds"], 2),
               "step_ms": round(1e3 * m["seconds"] / timed_steps, 3),
               "query_tokens": round(sum(q for q, _, _ in items) / len(items), 1),
               "context_tokens": round(sum(c for _, c, _ in items) / len(items), 1)}
        if ceilings:
            f = window_floor(config, items, batch, dtype_bytes, ceilings)
            row.update({"floor_ms": significant(1e3 * f["floor_s"], 5),
                        "pct_of_floor": significant(100 * f["floor_s"] * timed_steps / m["seconds"], 3),
                        "bound": f["bound"]})
        if args.timing == "generation" and args.reference == "on" and batch == 1:
            sync(device)
            t = time.perf_counter()
            ref_tokens = run_reference(model, prompts[0], params, config.mask_token_id)
            sync(device)
            ref_s = time.perf_counter() - t
            same = sum(a == b for a, b in zip(ref_tokens, m["outputs"][0].token_ids, strict=True))
            row.update({"reference_s": round(ref_s, 4), "reference_tok_s": round(gen_length / ref_s, 2),
                        "speedup": round(ref_s / m["seconds"], 2), "identical_tokens": f"{same}/{gen_length}"})
        row = {**row, **{c: row.get(c) for c in EXTRA_COLUMNS}}
        rows.append(row)
        print_table([row], [c for c in row if c not in base and row[c] is not None])
        if out is not None:  # row by row: a run stopped early keeps what it measured
            written = append_csv(out, [row], union=True)
        sys.stdout.flush()
    if rows and out is not None:
        print(f"# appended {len(rows)} rows to {written}")
    if failures:
        raise SystemExit(f"{len(failures)} configuration(s) failed: {'; '.join(failures)}")
    return rows


if __name__ == "__main__":
    main()
