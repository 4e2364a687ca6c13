"""The ``diffuse-engine`` command: ``generate``, ``info``, ``presets``, ``init-random``, and the quality tools
``train``, ``eval`` and ``sweep`` (in :mod:`.cli_quality`), ``serve`` (:mod:`.server_cli`), and ``profile`` and
``bench`` (:mod:`.cli_bench`).

Exit status: 0 on success, 2 for bad input (arguments, sampling parameters, a missing or broken model folder:
anything raising ``ValueError``), 1 for other failures, 130 when interrupted. Errors are printed as
``diffuse-engine: error: <message>`` on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn, TextIO

from ..sampling_params import CACHES, POLICIES, REMASKING, REMDM_VARIANTS, REVISIONS, SamplingParams
from ..version import __version__
from .common import UsageError, add_parallel_args, check_device, cuda_reason, parallel_config

PROG = "diffuse-engine"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in re.split(r"[,\s]+", text.strip()) if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog=PROG, description="Inference engine for masked-diffusion language models (LLaDA, Dream).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate an answer for one prompt",
                         description="Generate for one prompt. On a terminal the canvas is shown as it is denoised.")
    gen.add_argument("--model", required=True, metavar="DIR", help="model folder, shipped model or Hub ORG/NAME")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text ('-' reads stdin)")
    src.add_argument("--prompt-ids", type=_token_ids, metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    gen.add_argument("--dtype", help="float32, bfloat16, float16 or float64 (exactness checks) (default: the "
                                     "checkpoint's on CUDA, fp32 on CPU)")
    add_parallel_args(gen)
    sp = gen.add_argument_group("sampling parameters (see SamplingParams)")
    sp.add_argument("--effort", metavar="LEVEL", help="low, medium, high or a number in [0, 1]: sets the decoding "
                    "policy's knob (threshold by default; explicit flags win)")
    sp.add_argument("--gen-length", type=int, help="tokens to generate (default 128)")
    sp.add_argument("--block-length", type=int, help="block size; must divide gen-length (default: gen-length)")
    sp.add_argument("--steps", type=int, help="denoising steps over all blocks (default: gen-length)")
    sp.add_argument("--temperature", type=float, help="0 is greedy (default 0)")
    sp.add_argument("--remasking", choices=REMASKING, help="confidence ordering (default: the family's)")
    sp.add_argument("--alg-temp", type=float, help="Dream's position temperature")
    sp.add_argument("--top-p", type=float, help="nucleus filter in (0, 1]")
    sp.add_argument("--top-k", type=int, help="keep the k largest logits")
    sp.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 0: off)")
    sp.add_argument("--eps", type=float, help="Dream's final timestep (default 1e-3)")
    sp.add_argument("--logits-eos-inf", action="store_true", help="never predict EOS")
    sp.add_argument("--confidence-eos-eot-inf", action="store_true", help="commit end-of-turn tokens last")
    sp.add_argument("--early-stop", action="store_true", help="stop after the block that holds EOS")
    sp.add_argument("--seed", type=int, help="randomness key (default: drawn, and reported)")
    sp.add_argument("--cache", choices=CACHES, help="KV cache: none, prefix or dual (default none)")
    sp.add_argument("--cache-refresh", type=int, help="also refresh a prefix / dual cache every N steps")
    sp.add_argument("--policy", choices=POLICIES, help="decoding policy: fixed, threshold, factor or eb")
    sp.add_argument("--threshold", type=float, help="confidence threshold (policy threshold; default 0.9)")
    sp.add_argument("--factor", type=float, help="factor of the factor rule (default 1.0)")
    sp.add_argument("--eb-gamma", type=float, help="entropy budget of the EB-sampler (default 0.01)")
    sp.add_argument("--revision", choices=REVISIONS, help="revise committed tokens: remdm, wino or edit")
    sp.add_argument("--remdm-variant", choices=REMDM_VARIANTS, help="ReMDM schedule (default cap)")
    sp.add_argument("--remdm-eta", type=float, help="ReMDM eta (default 0.05)")
    sp.add_argument("--verify-threshold", type=float, help="wino: re-mask below this probability (default 0.9)")
    sp.add_argument("--edit-margin", type=float, help="edit: replace when beaten by this margin (default 0.2)")
    gen.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    gen.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                     help="show the denoising canvas (default: when stdout is a terminal)")
    gen.set_defaults(func=cmd_generate)

    for name, func, text in (("info", cmd_info, "versions, CUDA devices and kernel backends"),
                             ("presets", cmd_presets, "list the model presets and their parameter counts")):
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        cmd.add_argument("--json", action="store_true", help="print JSON")
        cmd.set_defaults(func=func)

    rnd = sub.add_parser("init-random", help="write a random-weight checkpoint folder of a preset")
    rnd.add_argument("--preset", required=True, metavar="NAME", help="preset name (see `presets`)")
    rnd.add_argument("--out", required=True, metavar="DIR", help="folder to write (must be empty or absent)")
    rnd.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    rnd.add_argument("--dtype", default="float32", help="weight dtype (default float32)")
    rnd.add_argument("--shard-size", type=int, metavar="BYTES", help="split the weights into shards of at most BYTES")
    rnd.add_argument("--overwrite", action="store_true", help="replace a previous checkpoint in DIR")
    rnd.set_defaults(func=cmd_init_random)

    from .cli_bench import add_bench_commands
    from .cli_lm_eval import add_lm_eval_command
    from .cli_quality import add_quality_commands
    from .server_cli import add_serve_command

    add_quality_commands(sub)
    add_serve_command(sub)
    add_bench_commands(sub)
    add_lm_eval_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["lm-eval"]:  # lm-eval's own arguments, unparsed here
            from .cli_lm_eval import run_lm_eval

            return run_lm_eval(argv[1:])
        args = parser.parse_args(argv)
        args.argv = argv
        return args.func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError) as exc:
        status, error = 2, exc
    except KeyboardInterrupt:
        status, error = 130, KeyboardInterrupt("interrupted")
    except Exception as exc:  # noqa: BLE001 - the command line reports every failure as one line
        status, error = 1, exc
    print(f"{PROG}: error: {str(error) or type(error).__name__}", file=sys.stderr)
    return status


# ------------------------------------------------------------------------------------------------- generate
def sampling_params_from_args(args: argparse.Namespace, llm=None) -> SamplingParams:
    """SamplingParams from the flags that were given; the others keep the model folder's generation defaults
    (``llm.default_params``) or the dataclass defaults. ``--effort`` sets what it maps to, under the given flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)
             if getattr(args, f.name, None) is not None}
    effort = getattr(args, "effort", None)
    if effort is not None and llm is None:
        raise UsageError("--effort needs the model: its family picks the rule.")
    try:
        return llm.default_params(effort=effort, **given) if llm is not None else SamplingParams(**given)
    except ValueError as exc:
        raise UsageError(f"invalid sampling parameters: {exc}") from None


def read_stdin_prompt(stream: TextIO) -> str:
    """The prompt given as ``--prompt -``: all of ``stream`` but one trailing newline (``\\n`` or ``\\r\\n``), the
    one that ``echo`` or a text editor adds."""
    text = stream.read()
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def cmd_generate(args: argparse.Namespace) -> int:
    """``generate``: load the folder, decode one prompt, print the answer (or JSON)."""
    if args.chat and args.prompt_ids is not None:
        raise UsageError("--chat applies to a --prompt text, not to --prompt-ids.")
    device = check_device(args.device)
    prompt = user_prompt = read_stdin_prompt(sys.stdin) if args.prompt == "-" else args.prompt
    from ..engine import EngineConfig
    from ..loader import resolve_model_path
    from .cli_view import LiveView, print_result
    from .llm import LLM

    llm = LLM(args.model, device=device, dtype=args.dtype, engine_config=EngineConfig(**parallel_config(args)))
    params = sampling_params_from_args(args, llm)
    tok, cfg = llm.tokenizer, llm.config
    if args.chat:
        if tok is None or not tok.has_chat_template:
            raise UsageError(f"--chat needs a chat template, and {args.model} has none.")
        prompt_ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        prompt_ids = llm.encode(prompt if args.prompt_ids is None else args.prompt_ids)
    live = args.live if args.live is not None else sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
    view, stops = None, {cfg.eos_token_id} | ({cfg.eot_token_id} if cfg.eot_token_id is not None else set())
    if live and not args.json:
        view = LiveView(sys.stdout, tok, steps=params.steps, steps_per_block=params.steps_per_block,
                        num_blocks=params.num_blocks, block_length=params.block_length, mask_id=cfg.mask_token_id,
                        special_ids=stops)
    start = time.perf_counter()
    try:
        out = llm.generate(prompt_ids, params, on_step=view.update if view else None)[0]
    finally:
        if view is not None:
            view.close()
    seconds = time.perf_counter() - start
    weight = next(llm.model.parameters())
    if args.json:
        record = {
            "prompt": user_prompt, "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
            "text": out.text, "nfe": out.nfe, "tokens_per_forward": out.tokens_per_forward,
            "finish_reason": out.finish_reason, "seed": out.seed, "seconds": seconds,
            "params": dataclasses.asdict(params),
            "model": {"path": str(resolve_model_path(args.model).resolve()), "arch": cfg.arch},
            "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
        }
        print(json.dumps(record, ensure_ascii=False))
        return 0
    print_result(out, seconds, stops, view, sys.stdout, sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------- info
def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def info_record() -> dict[str, Any]:
    """Everything ``info`` reports, as a JSON-ready dict."""
    import torch

    from ..ops import ATTENTION_ENV, BACKEND_ENV, attention_report, backend_report, requested_backend

    triton = next((v for v in map(_dist_version, ("triton", "pytorch-triton")) if v), None)
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_cuda_version": torch.version.cuda,
                            "devices": [], "reason": None}
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                    "memory_gib": round(props.total_memory / 1024 ** 3, 1)})
    else:
        cuda["reason"] = cuda_reason()
    env = os.environ.get(BACKEND_ENV)
    try:
        forced, env_error = requested_backend(), None
    except ValueError as exc:
        forced, env_error = None, str(exc)
    return {
        "version": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "triton": triton, "cuda": cuda,
        "backends": {name: {"available": ok, "reason": why} for name, (ok, why) in backend_report().items()},
        "diffuse_backend": {"value": env, "forced": forced, "error": env_error},
        "attention": {name: {"available": ok, "reason": why} for name, (ok, why) in attention_report().items()},
        "attention_env": os.environ.get(ATTENTION_ENV),
    }


def cmd_info(args: argparse.Namespace) -> int:
    """``info``: versions, CUDA devices and the kernel backends."""
    rec = info_record()
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    cuda, env = rec["cuda"], rec["diffuse_backend"]
    lines = [f"{PROG} {rec['version']}", f"python   {rec['python']} ({rec['platform']})",
             f"torch    {rec['torch']} (CUDA build: {cuda['torch_cuda_version'] or 'none'})",
             f"triton   {rec['triton'] or 'not installed'}",
             f"CUDA     {len(cuda['devices'])} device(s)" if cuda["available"] else f"CUDA     no: {cuda['reason']}"]
    lines += [f"  cuda:{d['index']}  {d['name']}  compute capability {d['capability']}  {d['memory_gib']} GiB"
              for d in cuda["devices"]]
    lines += ["backends"] + [f"  {name:<11} {'yes' if b['available'] else 'no':<4} {b['reason']}"
                             for name, b in rec["backends"].items()]
    lines.append("DIFFUSE_BACKEND not set (best available backend per op)" if env["value"] is None else
                 f"DIFFUSE_BACKEND={env['value']}" + (f"  (invalid: {env['error']})" if env["error"] else ""))
    lines += ["attention backends"] + [f"  {name:<11} {'yes' if b['available'] else 'no':<4} {b['reason']}"
                                       for name, b in rec["attention"].items()]
    lines.append("DIFFUSE_ATTENTION_BACKEND not set (automatic)" if rec["attention_env"] is None else
                 f"DIFFUSE_ATTENTION_BACKEND={rec['attention_env']}")
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------- presets, init-random
def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def cmd_presets(args: argparse.Namespace) -> int:
    """``presets``: the named model configurations with their parameter counts."""
    from ..presets import PRESETS

    rows = []
    for p in PRESETS.values():
        c = p.config
        rows.append({"name": p.name, "arch": c.arch, "parameters": c.num_parameters(),
                     "active_parameters": c.active_parameters(), "layers": c.num_layers,
                     "hidden_size": c.hidden_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
                     "experts": c.num_experts or 0, "vocab_size": c.vocab_size, "description": p.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<16} {'arch':<9} {'params':>7} {'active':>7} {'layers':>6} {'hidden':>6} {'heads':>7} {'vocab':>7}"
          f"  description")
    for r in rows:
        print(f"{r['name']:<16} {r['arch']:<9} {_count(r['parameters']):>7} {_count(r['active_parameters']):>7} "
              f"{r['layers']:>6} {r['hidden_size']:>6} {r['heads']:>3}/{r['kv_heads']:<3} {r['vocab_size']:>7}  "
              f"{r['description']}")
    return 0


def cmd_init_random(args: argparse.Namespace) -> int:
    """``init-random``: write a random-weight checkpoint folder of a preset."""
    from ..checkpoint import write_random_checkpoint
    from ..presets import from_name

    preset, out = from_name(args.preset), Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} is not empty; pass --overwrite to replace the checkpoint files in it.")
    folder = write_random_checkpoint(args.out, preset.name, seed=args.seed, dtype=args.dtype,
                                     shard_size=args.shard_size, overwrite=args.overwrite)
    files = sorted(p.name for p in Path(folder).iterdir())
    print(f"wrote {preset.name} ({_count(preset.config.num_parameters())} parameters, {args.dtype}, seed {args.seed}) "
          f"to {folder}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
