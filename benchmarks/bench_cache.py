"""Caches and parallel decoding against the reference loop: tokens/s of {no cache, prefix, dual} x {fixed steps,
threshold} on the same machine in one run, with the tokens' agreement with the reference and, for a task model,
the accuracy.

The reference loop is LLaDA's published ``generate()`` (re-expressed in tests/oracles.py: a full forward of the
whole batch per step, logits for every position, one token per step), run on the same batch of equal-length
prompts. Workloads (``model:gen_length:block_length``):
- ``llada-small:256:32``: a LLaDA-shaped random model (LLaDA's 126464-token vocabulary, 34.5M parameters);
- ``addition:256:32``: the shipped addition model on a 256-token canvas (it was trained on its 6-token answer
  canvas, so its accuracy there is not meaningful: this row measures speed);
- ``addition:6:6``: the same model on its own canvas, where accuracy is meaningful.

    python benchmarks/bench_cache.py            # CPU, appends to ./bench-results/cache_cpu.csv
    python benchmarks/bench_cache.py --quick    # seconds; what CI runs
    python benchmarks/bench_cache.py --workloads llada-8b:256:32 --batch 1 --device cuda --init on-device  # GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from diffuse_engine.bench.common import OUT, append_csv, print_table, stamp, sync  # noqa: E402
from oracles import llada_generate  # noqa: E402

from diffuse_engine import LLM, SamplingParams  # noqa: E402
from diffuse_engine.models import build_model  # noqa: E402
from diffuse_engine.presets import from_name  # noqa: E402
from diffuse_engine.quality.tasks import get_task  # noqa: E402

SETTINGS = [  # (name, SamplingParams fields)
    ("none/fixed", {}),
    ("prefix/fixed", {"cache": "prefix"}),
    ("dual/fixed", {"cache": "dual"}),
    ("none/threshold", {"policy": "threshold"}),
    ("prefix/threshold", {"policy": "threshold", "cache": "prefix"}),
    ("dual/threshold", {"policy": "threshold", "cache": "dual"}),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ["workload", "setting", "batch", "nfe", "tokens_per_forward", "seconds", "tokens_per_s", "speedup",
           "agreement", "accuracy", "reference_accuracy", "flop_ideal", "pct_of_ideal"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="llada-small:256:32,addition:256:32,addition:6:6",
                    help="comma-separated model:gen_length:block_length (model: a preset or a shipped model)")
    ap.add_argument("--batch", type=int, default=2, help="requests per run for random-model workloads")
    ap.add_argument("--task-batch", type=int, default=32, help="requests per run for task-model workloads")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens for random-model workloads")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--init", default="cpu", choices=["cpu", "on-device"], help="where random weights are drawn")
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths (CI smoke run)")
    ap.add_argument("--out", type=Path, default=None, help=f"CSV to append to (default {OUT}/cache_cpu.csv)")
    args = ap.parse_args(argv)
    if args.quick:
        args.workloads, args.batch, args.task_batch, args.prompt_len = "llada-tiny:32:16,addition:12:6", 2, 4, 8
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def _workload(spec: str, args: argparse.Namespace):
    name, gen, block = spec.split(":")
    gen, block = int(gen), int(block)
    task = None
    try:
        preset = from_name(name)
    except ValueError:
        preset = None
    if preset is not None:
        model = build_model(preset.config, device=args.device, dtype=DTYPES[args.dtype])
        model = model.init_random_(0, on_device=args.init == "on-device").eval()
        llm = LLM.from_model(model)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 256, (args.batch, args.prompt_len), generator=g).tolist()
    else:
        llm = LLM(name, device=args.device, dtype=args.dtype)
        task = get_task(name)
        prompts = [llm.tokenizer.encode(ex.prompt) for ex in task.test_set(args.task_batch)]
        if len({len(p) for p in prompts}) != 1:
            raise ValueError(f"the reference loop needs equal-length prompts; {name}'s test prompts differ.")
    return llm, task, prompts, gen, block


def schedule_flops(cost_model, cache: str, batch: int, prompt_len: int, gen: int, block: int, shift: int) -> float:
    """FLOPs of a whole fixed one-token-per-step generation with ``cache`` (the engine's cost model counts each
    step: matmuls, attention over the context read, the LM head over the block's masked rows). Per block: the
    first step recomputes everything (a cache refresh); then ``none`` recomputes the whole sequence, ``prefix`` from
    the block on (reading the prefix), ``dual`` the block (reading the rest)."""
    total, length = 0.0, prompt_len + gen
    for start in range(prompt_len, prompt_len + gen, block):
        for j in range(block):
            rows = block - j
            if j == 0 or cache == "none":
                item = (length, 0, rows)
            elif cache == "prefix":
                item = (length - start + shift, start - shift, rows)
            else:
                item = (block + shift, length - block - shift, rows)
            total += cost_model.predict([item] * batch).flops
    return total


def _accuracy(llm: LLM, task, prompts: list[list[int]], canvases: list[list[int]]) -> float | None:
    if task is None:
        return None
    cfg = llm.model.config
    stops = {cfg.eos_token_id, cfg.eot_token_id}
    ok = 0
    for p, c in zip(prompts, canvases, strict=True):
        cut = next((i for i, t in enumerate(c) if t in stops), len(c))
        ok += task.check(llm.tokenizer.decode(p), llm.tokenizer.decode(c[:cut]))
    return ok / len(prompts)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    base = stamp(args.device)
    for spec in args.workloads.split(","):
        llm, task, prompts, gen, block = _workload(spec, args)
        cfg = llm.model.config
        x = torch.tensor(prompts, device=args.device)
        sync(args.device)
        t0 = time.perf_counter()
        ref = llada_generate(llm.model, x, steps=gen, gen_length=gen, block_length=block,
                             mask_id=cfg.mask_token_id)[:, x.shape[1]:].tolist()
        sync(args.device)
        ref_s = time.perf_counter() - t0
        tokens = gen * len(prompts)
        ref_acc = _accuracy(llm, task, prompts, ref)
        rows.append({**base, "workload": spec, "setting": "reference loop", "batch": len(prompts), "nfe": gen,
                     "tokens_per_forward": 1.0, "seconds": round(ref_s, 3), "tokens_per_s": round(tokens / ref_s, 1),
                     "speedup": 1.0, "agreement": 1.0, "accuracy": ref_acc, "reference_accuracy": ref_acc,
                     "flop_ideal": None, "pct_of_ideal": None})
        shift = 1 if cfg.shifted_logits else 0
        flops = {c: schedule_flops(llm.engine.cost_model, c, len(prompts), len(prompts[0]), gen, block, shift)
                 for c in ("none", "prefix", "dual")}
        none_s = None
        for name, fields in SETTINGS:
            params = SamplingParams(gen_length=gen, block_length=block, steps=gen, seed=0,
                                    threshold=args.threshold, **fields)
            sync(args.device)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            sync(args.device)
            secs = time.perf_counter() - t0
            canv = [o.token_ids for o in outs]
            agree = sum(a == b for c, r in zip(canv, ref, strict=True) for a, b in zip(c, r, strict=True)) / tokens
            nfe = sum(o.nfe for o in outs) / len(outs)
            # The cache's measured speedup over no cache against its FLOP ratio (fixed schedules only: a threshold
            # run's steps depend on the model).
            ideal = pct = None
            if name == "none/fixed":
                none_s = secs
            elif name.endswith("/fixed") and none_s is not None:
                cache = fields["cache"]
                ideal = flops["none"] / flops[cache]
                pct = round(100 * (none_s / secs) / ideal, 1)
                ideal = round(ideal, 2)
            rows.append({**base, "workload": spec, "setting": name, "batch": len(prompts), "nfe": round(nfe, 2),
                         "tokens_per_forward": round(gen / nfe, 2), "seconds": round(secs, 3),
                         "tokens_per_s": round(tokens / secs, 1), "speedup": round(ref_s / secs, 2),
                         "agreement": round(agree, 4), "accuracy": _accuracy(llm, task, prompts, canv),
                         "reference_accuracy": ref_acc, "flop_ideal": ideal, "pct_of_ideal": pct})
            print(f"{spec:<20} {name:<18} NFE {nfe:7.2f}  {tokens / secs:9.1f} tok/s  x{ref_s / secs:6.2f}  "
                  f"agreement {agree:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    out = args.out or OUT / ("cache_quick.csv" if args.quick else "cache_cpu.csv")
    written = append_csv(out, rows, union=True)
    print_table(rows, COLUMNS)
    print(f"appended {len(rows)} rows to {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
