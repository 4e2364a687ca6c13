"""How rank 0 tells the other ranks what to run: a command header through the process group's key-value store, then
its tensors by broadcast.

Workers wait on the store, not in a collective, so an idle engine never hits the collectives' timeout, and rank 0
never blocks on a command it sends (a store write returns at once; each worker has its own key and deletes it after
reading). The tensors follow on the process group (gloo on the CPU, NCCL on CUDA), whose timeout bounds every wait
of rank 0 on a worker that died or hangs.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text


class Channel:
    """The command channel of one process group. ``store``: its key-value store; ``device``: where the tensors
    live (the rank's device)."""

    def __init__(self, store, rank: int, world: int, device: torch.device, poll_s: float = 30.0) -> None:
        self.store, self.rank, self.world, self.device = store, rank, world, device
        self.poll = timedelta(seconds=poll_s)  # how often an idle worker checks that it should go on waiting
        self.seq = 0
        self.parent = os.getppid()

    def send(self, op: str, meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Rank 0: the command ``op`` with host ``meta`` and ``tensors`` (on the device)."""
        self.seq += 1
        specs = [(tuple(t.shape), t.dtype) for t in tensors]
        payload = pickle.dumps((op, meta, specs), protocol=pickle.HIGHEST_PROTOCOL)
        for r in range(1, self.world):
            self.store.set(f"cmd/{r}/{self.seq}", payload)
        for t in tensors:
            dist.broadcast(t.contiguous(), src=0)

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
        tensors = []
        for shape, dtype in specs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(t, src=0)
            tensors.append(t)
        return op, meta, tensors
