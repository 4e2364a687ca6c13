"""``diffuse-engine serve``: its flags, their checks, and running the server (:mod:`.server`) under uvicorn."""

import argparse
import contextlib
import os
from pathlib import Path

from .common import UsageError, add_parallel_args, check_device, parallel_config
from .server_input import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_TIMEOUT

API_KEY_ENV = "DIFFUSE_API_KEY"
__all__ = ["API_KEY_ENV", "add_serve_command", "serve"]


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Register ``diffuse-engine serve``."""
    cmd = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                         description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics).")
    cmd.add_argument("--model", required=True, metavar="DIR", help="model folder, zoo name or Hub ORG/NAME")
    cmd.add_argument("--served-model-name", metavar="NAME", help="the model id of the API (default: folder name)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    cmd.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    cmd.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    cmd.add_argument("--dtype", help="float32, bfloat16, float16 or float64 (default: the checkpoint's on CUDA, fp32 "
                                     "on CPU)")
    add_parallel_args(cmd)
    cmd.add_argument("--max-num-seqs", type=int, help="requests decoded per step (default 64)")
    cmd.add_argument("--kv-cache-tokens", type=int, help="token slots of the paged KV cache (default 16384)")
    cmd.add_argument("--api-key", metavar="KEY",
                     help=f"require 'Authorization: Bearer KEY' on every route but /health (default: the "
                          f"{API_KEY_ENV} environment variable; no key when neither is set)")
    cmd.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                     help=f"largest request body; a larger one gets 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    cmd.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="S",
                     help="seconds a client has to send a request body once its headers arrived; then 408 and "
                          f"the connection closes (default {DEFAULT_REQUEST_TIMEOUT:g})")
    cmd.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                     help="seconds an idle keep-alive connection stays open (default 5)")
    cmd.add_argument("--threads", type=int, metavar="N",
                     help="CPU threads of torch (torch.set_num_threads; default: torch's own choice, one per "
                          "core). On a machine with few cores shared with other work, set it, e.g. --threads 2")
    cmd.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    cmd.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """``serve``: load the model and run uvicorn until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise RuntimeError(f"serve needs fastapi and uvicorn ({exc}); pip install 'diffuse-engine[serve]'") from None
    from ..engine import EngineConfig
    from .async_engine import AsyncEngine
    from .server import build_app

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535; got {args.port}.")
    if args.max_request_bytes < 1:
        raise UsageError(f"--max-request-bytes must be >= 1; got {args.max_request_bytes}.")
    for flag in ("request_timeout", "keep_alive_timeout"):
        if not getattr(args, flag) > 0:  # also NaN
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0 seconds; got {getattr(args, flag)}.")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be an integer >= 1; got {args.threads}.")
    if args.api_key == "":
        raise UsageError("--api-key must not be empty.")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # before the model loads and the engine starts stepping
    limits = {k: getattr(args, k) for k in ("max_num_seqs", "kv_cache_tokens") if getattr(args, k) is not None}
    engine = AsyncEngine.from_pretrained(args.model, device=check_device(args.device), dtype=args.dtype,
                                         engine_config=EngineConfig(**limits, **parallel_config(args)))
    app = build_app(engine, args.served_model_name or Path(str(args.model).rstrip("/")).name, api_key=api_key,
                    max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_keep_alive=args.keep_alive_timeout)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down gracefully on
        uvicorn.Server(config).run()
    return 0
