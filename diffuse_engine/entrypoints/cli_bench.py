"""``diffuse-engine profile OP`` (every variant of one op, checked against fp64, then timed) and
``diffuse-engine bench SUITE`` (the benchmark suites). The work is done in :mod:`diffuse_engine.bench`; this module
only declares the flags."""

from __future__ import annotations

import argparse

PROFILE_OPS = ("attention", "row_stats", "lm_head_stats", "commit", "noise", "moe", "step")
SUITES = ("kernels", "engine", "cache", "serving", "cost-model", "quality", "gpu", "tensor-parallel")


def _add_model_flags(cmd: argparse.ArgumentParser) -> None:
    src = cmd.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="take the shapes from a model folder, zoo name or Hub ORG/NAME")
    src.add_argument("--preset", metavar="NAME", help="take the shapes from a preset (see `presets`)")
    cmd.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    cmd.add_argument("--dtype", help="float32, bfloat16, float16 or float64 (default: bfloat16 on CUDA, float32 on "
                                     "the CPU)")
    cmd.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    cmd.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="draw progress bars on stderr (default: when stderr is a terminal)")


def _add_profile(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "profile", help="time every variant of one op, each checked against fp64 first",
        description="Run every variant of OP available on the device (torch reference, Triton, CUDA, C++ twin, "
                    "SDPA backends, flash-attn), check each against the fp64 reference (error at most twice plain "
                    "torch's in the same dtype, or exact where the op is exact), and time the correct ones. "
                    "A variant that disagrees is reported as wrong and not timed.")
    cmd.add_argument("op", choices=PROFILE_OPS, metavar="OP", help="one of: " + ", ".join(PROFILE_OPS))
    _add_model_flags(cmd)
    cmd.add_argument("--shape", action="append", metavar="SPEC",
                     help="a shape instead of the default grid (repeatable); keys per OP: attention "
                          "B=1,S=320,H=32,KV=32,D=128[,block=32] or B=16,L=32,P=1024,H=32,KV=32,D=128 (block over a "
                          "cache); row_stats M=256,V=126464; lm_head_stats M=32,V=126464,D=4096; commit B=32,R=32; "
                          "noise M=256,V=126464[,kind=uniform]; moe N=32,D=2048,I=512,E=256,K=8; "
                          "step B=1,P=64,G=256,K=32")
    cmd.add_argument("--variants", metavar="NAMES", help="comma-separated variant names to run (default: all)")
    cmd.add_argument("--json", action="store_true", help="print the rows as one JSON list and nothing else")
    cmd.add_argument("--csv", metavar="FILE", help="also write the rows to FILE")
    cmd.add_argument("--compare", metavar="OLD_CSV", help="mark changes beyond the measured noise against an "
                                                          "earlier --csv file")
    cmd.add_argument("--warmup", type=int, metavar="N", help="CPU: untimed calls before timing (default 1)")
    cmd.add_argument("--reps", type=int, metavar="N", help="CPU: timed calls (default 7, 3 with --quick); "
                                                            "profile step: steady steps timed (default 5)")
    step = cmd.add_argument_group("profile step")
    step.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"], help="KV cache (default dual)")
    step.add_argument("--policy", default="threshold", choices=["fixed", "threshold", "factor", "eb"],
                      help="decoding policy (default threshold)")
    step.add_argument("--threshold", type=float, default=0.9, help="the threshold policy's bound (default 0.9)")
    step.add_argument("--trace", metavar="DIR", help="write the torch.profiler Chrome trace of each shape into DIR "
                                                     "and print the per-category breakdown")
    step.add_argument("--breakdown", action="store_true",
                      help="profile a few steady steps per shape and variant (as --trace, without keeping the trace) "
                           "and add their per-category rows (kind = step, category, idle, kernel) to --csv")
    cmd.set_defaults(func=cmd_profile)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser(
        "bench", help="run a benchmark suite and write its CSV (and plots) into a folder",
        description="Run one benchmark suite. Rows carry date, commit, device, versions and the command; they are "
                    "written under --out (default: ./bench-<date>-<device>/), never into the checkout's own files.")
    cmd.add_argument("suite", choices=SUITES, metavar="SUITE", help="one of: " + ", ".join(SUITES))
    _add_model_flags(cmd)
    cmd.add_argument("--out", metavar="DIR", help="output folder (default: ./bench-<date>-<device>/)")
    cmd.add_argument("--compare", metavar="DIR", help="print the ratio of each row to a previous run's folder")
    cmd.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                     help="draw the suite's plots (needs matplotlib; default: when it is installed)")
    _add_suite_knobs(cmd)
    cmd.set_defaults(func=cmd_bench)


def _add_suite_knobs(cmd: argparse.ArgumentParser) -> None:
    """What the engine and cache suites measure, beyond their --quick and full presets (the GPU suite runs them
    with these flags)."""
    from ..bench.suites.options import ints, names

    knobs = cmd.add_argument_group("engine, cache, serving and cost-model suites (default: the suite's preset)")
    knobs.add_argument("--batches", type=ints, metavar="N,N", help="batches (sequences per step), e.g. 1,8,32,64")
    knobs.add_argument("--caches", type=names(("none", "prefix", "dual")), metavar="MODES",
                       help="KV-cache modes, e.g. none,prefix,dual")
    knobs.add_argument("--graphs", type=names(("on", "off")), metavar="on,off",
                       help="CUDA graphs on and/or off (default: the engine's default)")
    knobs.add_argument("--gen-lengths", type=ints, metavar="N,N", help="generated tokens per request")
    knobs.add_argument("--block-length", type=int, metavar="N", help="tokens per block")
    knobs.add_argument("--prompt-len", type=int, metavar="N", help="prompt tokens of random-weight requests")
    knobs.add_argument("--tokens-per-step", type=ints, metavar="N,N", help="fixed schedules' tokens per step")
    knobs.add_argument("--timing", choices=("generation", "steady"),
                       help="engine: whole generations, or steady steps of the first block")
    knobs.add_argument("--warmup-steps", type=int, metavar="N", help="engine, steady timing: untimed steps first")
    knobs.add_argument("--timed-steps", type=int, metavar="N", help="engine, steady timing: steps timed")
    knobs.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                       help="engine: also run the reference loop at batch 1 (default: on, from a checkout)")
    knobs.add_argument("--seed", type=int, metavar="N", help="seed of the random weights and prompts")
    knobs.add_argument("--tensor-parallel-size", type=int, metavar="N",
                       help="tensor-parallel suite: ranks compared with one (default 2)")


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``profile`` and ``bench``."""
    _add_profile(sub)
    _add_bench(sub)


def cmd_profile(args: argparse.Namespace) -> int:
    from ..bench.profile import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.suites import run

    return run(args)
