"""The persistent batch: every running request's tokens and commit confidences on the model's device, one slot
each, and their host mirror.

A slot is a row of ``capacity`` positions; a request keeps its slot from admission to its end, and every step
reads and writes the slots in place (flat index ``slot * capacity + position``). One extra flat entry at the end,
:attr:`CanvasStore.trash`, absorbs the writes of padding rows, so that no padded row ever aliases a real position.
The host mirror (numpy, same layout) is what :class:`~.request.Request` ``seq`` views; the engine brings it up to
date from the step's one device-to-host copy, so the host never reads device memory to decide anything.

Capacity grows (powers of two, up to the model's maximum length) when a longer request is admitted; growing
reallocates the device tensors, which invalidates every plan and captured CUDA graph (they hold its addresses).
"""

from __future__ import annotations

import numpy as np
import torch

from .request import Request


class CanvasStore:
    def __init__(self, num_slots: int, max_length: int, device: torch.device, mask_id: int,
                 initial_capacity: int = 512) -> None:
        self.num_slots = num_slots
        self.max_length = max_length
        self.device = device
        self.mask_id = mask_id
        self.capacity = 0
        self.generation = 0  # bumped at every reallocation: plans and graphs built before it are stale
        self._free = list(range(num_slots - 1, -1, -1))
        self._owner: dict[int, Request] = {}
        self.tokens = torch.empty(0, dtype=torch.int64, device=device)
        self.conf = torch.empty(0, dtype=torch.float32, device=device)
        self.host_tokens = np.empty((0, 0), dtype=np.int64)
        self.host_conf = np.empty((0, 0), dtype=np.float32)
        self._grow(min(max(initial_capacity, 1), max_length))

    @property
    def trash(self) -> int:
        """The flat index of the entry that padding rows write (never read as a position)."""
        return self.num_slots * self.capacity

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def _grow(self, capacity: int) -> None:
        capacity = min(max(capacity, 1), self.max_length)
        old_cap = self.capacity
        tokens = torch.full((self.num_slots * capacity + 1,), self.mask_id, dtype=torch.int64, device=self.device)
        conf = torch.zeros(self.num_slots * capacity + 1, dtype=torch.float32, device=self.device)
        host_tokens = np.full((self.num_slots, capacity), self.mask_id, dtype=np.int64)
        host_conf = np.zeros((self.num_slots, capacity), dtype=np.float32)
        if old_cap:
            keep = min(old_cap, capacity)
            tokens[:-1].view(self.num_slots, capacity)[:, :keep] = self.tokens[:-1].view(self.num_slots, old_cap)[
                :, :keep]
            conf[:-1].view(self.num_slots, capacity)[:, :keep] = self.conf[:-1].view(self.num_slots, old_cap)[:, :keep]
            host_tokens[:, :keep] = self.host_tokens[:, :keep]
            host_conf[:, :keep] = self.host_conf[:, :keep]
        self.tokens, self.conf, self.host_tokens, self.host_conf = tokens, conf, host_tokens, host_conf
        self.capacity = capacity
        self.generation += 1
        for slot, req in self._owner.items():  # re-point the running requests' views at the new mirror
            self._bind(req, slot)

    def _bind(self, req: Request, slot: int) -> None:
        n = req.seq_len
        req.seq = torch.from_numpy(self.host_tokens[slot, :n])
        req.commit_conf = torch.from_numpy(self.host_conf[slot, :n])

    def admit(self, req: Request) -> None:
        """Give ``req`` a slot and put its tokens (prompt + masks, or a continuation's) on the device."""
        if not self._free:
            raise RuntimeError("no free slot: the engine admitted more requests than max_num_seqs.")
        n = req.seq_len
        if n > self.capacity:
            cap = self.capacity
            while cap < n:
                cap *= 2
            self._grow(cap)
        slot = self._free.pop()
        tokens, conf = req.seq.numpy(), req.commit_conf.numpy()
        self.host_tokens[slot, :n] = tokens
        self.host_tokens[slot, n:] = self.mask_id
        self.host_conf[slot, :n] = conf
        self.host_conf[slot, n:] = 0.0
        row = slice(slot * self.capacity, slot * self.capacity + self.capacity)
        self.tokens[row].copy_(upload(self.host_tokens[slot], self.device), non_blocking=True)
        self.conf[row].copy_(upload(self.host_conf[slot], self.device), non_blocking=True)
        req.slot = slot
        self._owner[slot] = req
        self._bind(req, slot)

    def release(self, req: Request) -> None:
        """Free ``req``'s slot; its ``seq`` and ``commit_conf`` become copies that stay valid."""
        if req.slot is None:
            return
        req.seq = req.seq.clone()
        req.commit_conf = req.commit_conf.clone()
        self._owner.pop(req.slot, None)
        self._free.append(req.slot)
        req.slot = None

    def restore(self, req: Request) -> None:
        """Put ``req``'s host mirror back on the device: after a step that failed part-way (its commit may have
        written the device canvas, never the mirror), the request resumes from its last completed step."""
        if req.slot is None:
            return
        row = slice(req.slot * self.capacity, (req.slot + 1) * self.capacity)
        self.tokens[row].copy_(upload(self.host_tokens[req.slot], self.device), non_blocking=True)
        self.conf[row].copy_(upload(self.host_conf[req.slot], self.device), non_blocking=True)

    def fill(self, req: Request, lo: int, hi: int, token: int) -> None:
        """Set positions [lo, hi) of ``req`` to ``token`` on the device and in the mirror (no synchronisation)."""
        if hi <= lo:
            return
        base = req.slot * self.capacity
        self.tokens[base + lo:base + hi].fill_(token)
        self.host_tokens[req.slot, lo:hi] = token


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``: through pinned memory and a non-blocking copy on CUDA (the caching
    host allocator keeps the pinned block alive until the copy has run)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Upload:
    """Host arrays packed into one int64 buffer, copied to the device once, then viewed with their own dtypes
    (bool and integers as int64 words, floats as float64 bit patterns)."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, np.ndarray, torch.dtype, tuple[int, ...]]] = []

    def add(self, name: str, array, dtype: torch.dtype) -> None:
        a = np.asarray(array)
        self._parts.append((name, a, dtype, a.shape))

    def finish(self, device: torch.device) -> dict[str, torch.Tensor]:
        words = []
        for _, a, dtype, _ in self._parts:
            if dtype.is_floating_point:
                words.append(np.ascontiguousarray(a, dtype=np.float64).reshape(-1).view(np.int64))
            else:
                words.append(np.ascontiguousarray(a, dtype=np.int64).reshape(-1))
        flat = upload(np.concatenate(words) if words else np.zeros(0, dtype=np.int64), device)
        out, at = {}, 0
        for (name, _, dtype, shape), w in zip(self._parts, words, strict=True):
            seg = flat[at:at + w.shape[0]]
            at += w.shape[0]
            if dtype.is_floating_point:
                seg = seg.view(torch.float64)
            out[name] = (seg if seg.dtype == dtype else seg.to(dtype)).view(shape)
        return out
