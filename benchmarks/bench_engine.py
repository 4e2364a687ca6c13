"""End-to-end engine benchmark: tokens/s, NFE and tokens per forward of the engine against the reference loop
(LLaDA's published ``generate()``, re-expressed in tests/oracles.py), same device, same model, one run, with a
check that both produce identical tokens.

CPU (the default): a LLaDA-shaped random model (preset ``llada-small``: LLaDA's 126464-token vocabulary,
34.5M parameters), gen_length 128 and 256, block 32, one token per step.
GPU: ``--preset llada-8b --device cuda --dtype bfloat16 --init on-device --tokens-per-step 1,2,4,8`` measures
step time against the floor max(bytes / bandwidth, FLOPs / peak) with the device's measured ceilings.

    python benchmarks/bench_engine.py                       # CPU, writes benchmarks/results/engine_cpu.csv
    python benchmarks/bench_engine.py --quick               # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import RESULTS, append_csv, measure_ceilings, print_table, stamp, step_cost, sync  # noqa: E402

from diffuse_engine import LLM, SamplingParams  # noqa: E402
from diffuse_engine.models import build_model  # noqa: E402
from diffuse_engine.presets import from_name  # noqa: E402

EXTRA_COLUMNS = ("floor_ms", "pct_of_floor", "bound", "reference_s", "reference_tok_s", "speedup", "identical_tokens")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


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
    ap.add_argument("--reference", default="on", choices=["on", "off"],
                    help="also run the reference loop (batch 1 rows only) and compare tokens")
    ap.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and matmul rate for the floor")
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths (CI smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="CSV to append to (default benchmarks/results/...)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.gen_lengths, args.block_length, args.prompt_len = "llada-tiny", [32], 16, 8
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


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


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    preset = from_name(args.preset)
    config = preset.config
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = build_model(config, device=device, dtype=dtype).init_random_(args.seed, on_device=args.init == "on-device")
    print(f"# {args.preset}: {config.num_parameters() / 1e6:.1f}M parameters, {args.dtype} on {device}, "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    llm = LLM.from_model(model)
    ceilings = measure_ceilings(device) if args.ceilings else None
    if ceilings:
        print(f"# ceilings: copy {ceilings['bandwidth_gbs']:.0f} GB/s, matmul {ceilings['peak_tflops']:.1f} TFLOP/s "
              f"({ceilings['matmul_dtype']})", flush=True)
    # warm-up: kernels, allocator, caches
    llm.generate(random_prompts(config, 1, args.prompt_len, 99),
                 SamplingParams(gen_length=args.block_length, block_length=args.block_length, steps=2))
    base = stamp(device)
    rows = []
    for gen_length in args.gen_lengths:
        for batch in args.batches:
            for tps in args.tokens_per_step:
                steps = gen_length // tps
                params = SamplingParams(gen_length=gen_length, block_length=args.block_length, steps=steps)
                prompts = random_prompts(config, batch, args.prompt_len, args.seed + batch)
                sync(device)
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                sync(device)
                engine_s = time.perf_counter() - t
                nfe = outs[0].nfe
                row = {**base, "preset": args.preset, "dtype": args.dtype, "batch": batch,
                       "prompt_len": args.prompt_len, "gen_length": gen_length, "block_length": args.block_length,
                       "steps": steps, "tokens_per_step": tps, "nfe": nfe,
                       "tokens_per_forward": round(gen_length / nfe, 3), "engine_s": round(engine_s, 4),
                       "engine_tok_s": round(batch * gen_length / engine_s, 2),
                       "step_ms": round(1e3 * engine_s / nfe, 3)}
                if ceilings:
                    rows_per_step = batch * (args.block_length + tps) / 2
                    cost = step_cost(config, [args.prompt_len + gen_length] * batch, int(rows_per_step),
                                     torch.tensor([], dtype=dtype).element_size())
                    floor = max(cost["bytes"] / (ceilings["bandwidth_gbs"] * 1e9),
                                cost["flops"] / (ceilings["peak_tflops"] * 1e12))
                    row.update({"floor_ms": round(1e3 * floor, 3),
                                "pct_of_floor": round(100 * floor * nfe / engine_s, 1),
                                "bound": "memory" if cost["bytes"] / ceilings["bandwidth_gbs"] / 1e9 >=
                                cost["flops"] / ceilings["peak_tflops"] / 1e12 else "compute"})
                if args.reference == "on" and batch == 1:
                    sync(device)
                    t = time.perf_counter()
                    ref_tokens = run_reference(model, prompts[0], params, config.mask_token_id)
                    sync(device)
                    ref_s = time.perf_counter() - t
                    same = sum(a == b for a, b in zip(ref_tokens, outs[0].token_ids, strict=True))
                    row.update({"reference_s": round(ref_s, 4), "reference_tok_s": round(gen_length / ref_s, 2),
                                "speedup": round(ref_s / engine_s, 2),
                                "identical_tokens": f"{same}/{gen_length}"})
                row = {**row, **{c: row.get(c) for c in EXTRA_COLUMNS}}
                rows.append(row)
                print_table([row], [c for c in row if c not in base and row[c] is not None])
                sys.stdout.flush()
    out = args.out or RESULTS / f"engine_{device.type}.csv"
    if not args.quick or args.out:
        append_csv(out, rows)
        print(f"# appended {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    main()
