"""Starting and stopping the ranks of a tensor-parallel model (:func:`launch`, :class:`TPRuntime`).

Two ways in:

- ``"spawn"`` (default): rank 0 is the calling process; it starts ``size - 1`` fresh worker processes itself
  (``python -m diffuse_engine.distributed.worker``: nothing of the caller's ``__main__`` is re-imported, so a script
  needs no ``if __name__ == "__main__"`` guard), serves them a TCP key-value store on the loopback, and every rank
  joins one process group (gloo on the CPU, NCCL on CUDA, rank r on ``cuda:r``).
- ``"env"``: every rank was started by a launcher such as ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` / ``MASTER_PORT``), on one node or several. Rank 0 returns the model as usual; on every other
  rank :func:`launch` serves rank 0's commands and then ends the process (``SystemExit(0)``) when rank 0 shuts
  down, so a script written for one process runs unchanged under ``torchrun``.

Each rank reads only its own slices of the weights. Rank 0 waits for every worker to report ready (or an error,
which it raises). The settings are checked before anything starts (:func:`check_tensor_parallel`).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine.config import DISTRIBUTED_INIT
from ..errors import TensorParallelError
from .channel import Channel, make_group
from .context import TPContext
from .sharding import check_tensor_parallel
from .worker import WorkerSpec, load_shard, rank_device, serve, share_cpu_threads, spawn_worker


class TPRuntime:
    """Rank 0's handle on the other ranks: their processes (spawn) and the process group; :meth:`shutdown` stops
    them (also at interpreter exit)."""

    def __init__(self, size: int, mode: str, procs: list, store) -> None:
        self.size, self.mode, self.procs, self.store = size, mode, procs, store
        self.context: TPContext | None = None
        self.closed = False
        self.threads = torch.get_num_threads()  # the caller's, given back at shutdown (CPU ranks share the cores)
        atexit.register(self.shutdown)

    def describe(self) -> str:
        """One sentence on the workers' state (for error messages)."""
        if self.mode != "spawn":
            return "(ranks started by the launcher: see their own logs.)"
        parts = []
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is None:
                parts.append(f"rank {rank} (pid {p.pid}) is running")
            else:
                parts.append(f"rank {rank} (pid {p.pid}) exited with code {p.returncode}")
        return "Workers: " + "; ".join(parts) + "."

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (asked to, then terminated, then killed) and leave the process group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)
        ctx = self.context
        if ctx is not None and ctx.broken is None:
            try:
                ctx.stop()
            except Exception:  # noqa: BLE001 - the workers are stopped by force below
                pass
        elif ctx is not None:  # a broken group: the workers may hang; do not wait for them
            timeout_s = min(timeout_s, 1.0)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # also a stopped (SIGSTOP) or hung process
                p.wait()
        if ctx is not None:
            ctx.channel.group = None  # the backend's connections close with it
        self.store = None
        torch.set_num_threads(self.threads)

    def alive_workers(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]


def _wait_keys(store, keys: list[str], procs: list, timeout_s: float | None, what: str) -> None:
    """Wait until every key is set, failing early when a worker process exits or writes its error key."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(keys)
    while pending:
        for key in list(pending):
            rank = key.rpartition("/")[2]
            if store.check([f"error/{rank}"]):
                raise TensorParallelError(f"tensor-parallel rank {rank} failed while {what}: "
                                          f"{store.get(f'error/{rank}').decode()}")
            if store.check([key]):
                pending.remove(key)
        for key in pending:
            rank = int(key.rpartition("/")[2])
            p = procs[rank - 1] if rank - 1 < len(procs) else None
            if p is not None and p.poll() is not None:
                raise TensorParallelError(f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.returncode} "
                                          f"while {what}.")
        if deadline is not None and time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel ranks {', '.join(k.rpartition('/')[2] for k in pending)} "
                                      f"did not finish {what} within {timeout_s:.0f} s.")
        if pending:
            time.sleep(0.05)


def launch(path, *, size: int, device: torch.device | str, dtype=None, check_weights: bool | None = None,
           init: str = "spawn", timeout_s: float = 120.0):
    """Start a tensor-parallel model of ``size`` ranks from the folder ``path``; returns rank 0's
    ``(model, config, tokenizer, runtime)``. ``timeout_s`` bounds every collective (how long rank 0 waits for a
    worker that hangs) and the workers' start."""
    from ..loader import read_model_config

    if init not in DISTRIBUTED_INIT:
        raise ValueError(f"distributed_init must be one of {', '.join(DISTRIBUTED_INIT)}; got {init!r}.")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"distributed_timeout_s must be a positive number of seconds; got {timeout_s!r}.")
    device = torch.device(device)
    config = read_model_config(path)
    if init == "env":
        return _launch_env(path, config, size, device, dtype, check_weights, timeout_s)
    check_tensor_parallel(config, size, device)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)
    procs = []
    runtime = TPRuntime(size, "spawn", procs, store)
    try:
        for rank in range(1, size):
            spec = WorkerSpec(str(path), rank, size, "127.0.0.1", store.port, device.type, dtype, check_weights,
                              float(timeout_s), os.getpid())
            procs.append(spawn_worker(spec))
        _wait_keys(store, [f"hello/{r}" for r in range(1, size)], procs, max(timeout_s, 60.0), "starting")
        dev = rank_device(device.type, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            share_cpu_threads(size)
        group = make_group(store, 0, size, dev, timeout)
        model, config, tokenizer, plan = load_shard(path, 0, size, dev, dtype, check_weights)
        _wait_keys(store, [f"ready/{r}" for r in range(1, size)], procs, None, "loading its shard")
        ctx = TPContext(0, size, config.vocab_size, dev, Channel(store, group, 0, size, dev),
                        describe=runtime.describe)
        plan.attach(model, ctx)
        runtime.context = ctx
        ctx.measure_link(model.dtype)
        return model, config, tokenizer, runtime
    except BaseException:
        runtime.shutdown(timeout_s=2.0)
        raise


def _launch_env(path, config, size: int, device: torch.device, dtype, check_weights, timeout_s: float):
    """``init="env"``: join the launcher's group (``env://``)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ValueError("distributed_init='env' needs RANK and WORLD_SIZE in the environment (start the program "
                         "with torchrun).") from None
    if world != size:
        raise ValueError(f"tensor_parallel_size is {size} but the launcher started {world} processes (WORLD_SIZE).")
    check_tensor_parallel(config, size, device if device.type != "cuda" else "cpu")
    dev = rank_device(device.type, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore("diffuse/", _launcher_store(rank, world, timeout))
    group = make_group(store, rank, world, dev, timeout)
    try:
        model, config, tokenizer, plan = load_shard(path, rank, world, dev, dtype, check_weights)
    except Exception as exc:
        store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}")
        raise
    if rank:
        ctx = TPContext(rank, world, config.vocab_size, dev, Channel(store, group, rank, world, dev))
        plan.attach(model, ctx)
        store.set(f"ready/{rank}", "1")
        try:
            serve(model, ctx)
        except ConnectionError:
            raise SystemExit(1) from None
        raise SystemExit(0)
    runtime = TPRuntime(size, "env", [], store)
    _wait_keys(store, [f"ready/{r}" for r in range(1, size)], [], timeout_s, "loading its shard")
    ctx = TPContext(0, world, config.vocab_size, dev, Channel(store, group, 0, world, dev), describe=runtime.describe)
    plan.attach(model, ctx)
    runtime.context = ctx
    ctx.measure_link(model.dtype)
    return model, config, tokenizer, runtime


def _launcher_store(rank: int, world: int, timeout: timedelta):
    """The launcher's key-value store at ``MASTER_ADDR:MASTER_PORT``: torchrun's own (its agent serves it), or one
    that rank 0 serves for a launcher that does not."""
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise ValueError("distributed_init='env' needs MASTER_ADDR and MASTER_PORT in the environment (start the "
                         "program with torchrun).") from None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(host, port, world, rank == 0 and not agent, timeout=timeout)
