"""The ranks' process group (:func:`make_group`) and how rank 0 tells the other ranks what to run: a command header
through the group's key-value store, then its tensors, packed as bytes into one broadcast.

The group is a torch.distributed backend (``ProcessGroupGloo`` on the CPU, ``ProcessGroupNCCL`` on CUDA) built on the
engine's own store, not the process-wide default group: one process may hold several tensor-parallel engines (one
after another, or side by side), and a program that uses torch.distributed for itself is not disturbed.

Workers wait on the store, not in a collective, so an idle engine never hits the collectives' timeout, and rank 0
never blocks on a command it sends (a store write returns at once; each worker has its own key and deletes it after
reading). The tensors follow on the process group (gloo on the CPU, NCCL on CUDA), whose timeout bounds every wait
of rank 0 on a worker that died or hangs.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text


def make_group(store, rank: int, world: int, device: torch.device, timeout: timedelta):
    """The ranks' collectives backend on ``store``: NCCL for CUDA devices, else gloo; every collective waits at most
    ``timeout``."""
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, world, options)
    return dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, world, timeout)


class Channel:
    """The command channel and collectives of one group of ranks. ``store``: its key-value store; ``group``: the
    backend of :func:`make_group`; ``device``: where the tensors live (the rank's device)."""

    def __init__(self, store, group, rank: int, world: int, device: torch.device, poll_s: float = 30.0) -> None:
        self.store, self.group, self.rank, self.world, self.device = store, group, rank, world, device
        self.poll = timedelta(seconds=poll_s)  # how often an idle worker checks that it should go on waiting
        # Host time spent in the step's collectives (all-reduces, all-gathers), for the benchmarks: the wall time
        # of each wait on the CPU (gloo); on CUDA only the enqueue (the work overlaps on the stream).
        self.collective_seconds = 0.0
        self.collectives = 0
        self.seq = 0
        self.parent = os.getppid()

    def send(self, op: str, meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Rank 0: the command ``op`` with host ``meta`` and ``tensors`` (on the device)."""
        self.seq += 1
        specs = [(tuple(t.shape), t.dtype) for t in tensors]
        payload = pickle.dumps((op, meta, specs), protocol=pickle.HIGHEST_PROTOCOL)
        for r in range(1, self.world):
            self.store.set(f"cmd/{r}/{self.seq}", payload)
        if tensors:  # one broadcast of all the command's bytes, each tensor's on an 8-byte boundary
            parts = []
            for t in tensors:
                raw = t.contiguous().reshape(-1).view(torch.uint8)
                parts.append(raw)
                if raw.numel() % 8:
                    parts.append(raw.new_zeros(8 - raw.numel() % 8))
            self.broadcast(torch.cat(parts))

    def receive(self, alive=None) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
        """A worker: the next command and its tensors. Waits as long as needed (polling ``alive()``, which returns
        False when the worker should give up, e.g. rank 0's process is gone)."""
        self.seq += 1
        key = f"cmd/{self.rank}/{self.seq}"
        while True:
            try:
                self.store.wait([key], self.poll)
                break
            except Exception as exc:  # noqa: BLE001 - the store raises its own error types
                if not _is_timeout(exc):
                    raise
                if alive is not None and not alive():
                    raise ConnectionError("rank 0 is gone") from None
        op, meta, specs = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        sizes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs]
        padded = [-(-n // 8) * 8 for n in sizes]
        tensors = []
        if specs:
            data = self.broadcast(torch.empty(sum(padded), dtype=torch.uint8, device=self.device))
            for (shape, dtype), n, part in zip(specs, sizes, data.split(padded), strict=True):
                tensors.append(part[:n].view(dtype).reshape(shape))
        return op, meta, tensors

    # ------------------------------------------------------------------ collectives (each waits for its result)
    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self.group.broadcast(t, 0).wait()
        return t

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        t0 = time.perf_counter()
        self.group.allreduce(t).wait()
        self.collective_seconds += time.perf_counter() - t0
        self.collectives += 1
        return t

    def all_gather(self, outputs: list[torch.Tensor], t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.group.allgather([outputs], [t]).wait()
        self.collective_seconds += time.perf_counter() - t0
        self.collectives += 1
