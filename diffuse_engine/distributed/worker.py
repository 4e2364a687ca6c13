"""A tensor-parallel rank other than 0: join the process group, load this rank's shards, then run rank 0's commands
until it says stop (or is gone).

A worker started by the engine (``spawn``) dies with its parent: the kernel sends it SIGKILL when the parent exits
(``PR_SET_PDEATHSIG`` on Linux), and it also stops when its parent process id changes or the command store
becomes unreachable. So no worker outlives the engine that started it.
"""

from __future__ import annotations

import base64
import ctypes
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .channel import Channel, make_group
from .context import TPContext
from .sharding import ShardPlan


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a spawned worker needs: the model, its rank, and how to reach rank 0's store."""

    path: str
    rank: int
    world: int
    host: str
    port: int
    device: str  # "cpu" or "cuda" (the worker takes cuda:<rank>)
    dtype: torch.dtype | None
    check_weights: bool | None
    timeout_s: float
    parent: int


def share_cpu_threads(world: int) -> None:
    """On the CPU the ranks share the machine's cores: each takes ``cores // world`` intra-op threads (at least one),
    so that the ranks do not oversubscribe the cores (which costs several times the step time)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores // world)))


def rank_device(kind: str, index: int) -> torch.device:
    return torch.device(f"cuda:{index}") if kind == "cuda" else torch.device("cpu")


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the parent died before the flag was set
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="diffuse-tp-parent-watch", daemon=True).start()


def load_shard(path: str, plan_rank: int, world: int, device: torch.device, dtype, check_weights):
    """This rank's shard of the model folder ``path`` (only its slices are read)."""
    from ..loader import load_model, read_model_config

    plan = ShardPlan(read_model_config(path), plan_rank, world)
    model, config, tokenizer = load_model(path, device=device, dtype=dtype, check_weights=check_weights, shard=plan)
    return model, config, tokenizer, plan


def serve(model, ctx: TPContext, alive=None) -> None:
    """Run rank 0's commands on ``model`` until ``stop``."""
    with torch.inference_mode():
        while True:
            op, meta, tensors = ctx.channel.receive(alive)
            if not ctx.run_command(model, op, meta, tensors):
                return


def spawn_worker(spec: WorkerSpec) -> subprocess.Popen:
    """Start the worker process of ``spec``: a fresh interpreter running this module (its output goes to the
    parent's stderr)."""
    payload = base64.b64encode(pickle.dumps(spec)).decode()
    # The store's idle polls (one a second) would each log a timeout warning from c10d's C++ side.
    env = dict(os.environ, DIFFUSE_TP_WORKER=payload, TORCH_CPP_LOG_LEVEL="ERROR")
    return subprocess.Popen([sys.executable, "-m", "diffuse_engine.distributed"], env=env,
                            stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno() if _has_fileno() else None)


def _has_fileno() -> bool:
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(spec.parent)
    timeout = timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore(spec.host, spec.port, spec.world, False, timeout=timeout)
    store.set(f"hello/{spec.rank}", str(os.getpid()))
    device = rank_device(spec.device, spec.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cpu_threads(spec.world)
    group = make_group(store, spec.rank, spec.world, device, timeout)
    try:
        model, config, _, plan = load_shard(spec.path, spec.rank, spec.world, device, spec.dtype, spec.check_weights)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        store.set(f"error/{spec.rank}", f"{type(exc).__name__}: {exc}")
        os._exit(1)
    channel = Channel(store, group, spec.rank, spec.world, device, poll_s=1.0)
    ctx = TPContext(spec.rank, spec.world, config.vocab_size, device, channel)
    plan.attach(model, ctx)
    store.set(f"ready/{spec.rank}", "1")
    try:
        serve(model, ctx, alive=lambda: os.getppid() == spec.parent)
    except BaseException:  # noqa: BLE001 - rank 0 is gone or the group broke: nothing to report to
        os._exit(1)
    os._exit(0)
