"""End-to-end engine benchmark: tokens/s, NFE and tokens per forward of the engine against the reference loop
(LLaDA's published ``generate()``, re-expressed in tests/oracles.py), same device, same model, one run, with a
check that both produce identical tokens; and steady-state step times per KV-cache mode and CUDA-graph setting.
The work is done in :mod:`diffuse_engine.bench.suites.engine` (also ``diffuse-engine bench engine``).

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

from diffuse_engine.bench.common import OUT  # noqa: E402
from diffuse_engine.bench.suites.engine import CACHES, GRAPHS, measure_all  # noqa: E402
from diffuse_engine.bench.suites.options import DTYPES, PartialFailure, ints, names  # noqa: E402


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


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = args.out or (None if args.quick else OUT / f"engine_{args.device.split(':')[0]}.csv")
    try:
        return measure_all(args, out)
    except PartialFailure as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
