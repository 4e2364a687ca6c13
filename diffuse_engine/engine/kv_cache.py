"""Paged KV cache shared by all running requests (the per-forward plan that attends over it is
:mod:`.attention_plan`).

Keys and values live in one pool of ``num_pages`` pages of ``page_size`` token slots per layer; a request owns
a list of pages (its page table) covering its whole sequence, allocated when it is admitted and freed when it
finishes or is aborted. Logical position ``p`` of a request lives in slot ``table[p // page_size] * page_size +
p % page_size``. Keys are stored after RoPE. Nothing is allocated per request besides its page list.

Page tables are host tensors (int64, CPU); allocation and freeing never touch the device.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import KVCacheFullError


class PagedKVCache:
    """A pool of K/V pages for every layer of one model.

    ``k`` and ``v`` are ``[num_layers, num_pages * page_size, num_kv_heads, head_dim]`` (slot-major, so that a
    request's cached keys are one gather). Allocation is a free list: O(pages) per request, no fragmentation
    beyond the last partial page of each request.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, num_tokens: int) -> torch.Tensor:
        """Pages for ``num_tokens`` logical positions (int64 page table). Raises :class:`KVCacheFullError`."""
        need = self.pages_for(num_tokens)
        if need > len(self._free):
            raise KVCacheFullError(f"the KV cache has {len(self._free)} free pages of {self.page_size} tokens; "
                                   f"{need} are needed for {num_tokens} tokens.")
        pages = [self._free.pop() for _ in range(need)]
        return torch.tensor(pages, dtype=torch.int64)

    def free(self, pages: torch.Tensor | np.ndarray | None) -> None:
        if pages is None:
            return
        ids = np.asarray(pages).reshape(-1).tolist()
        if len(set(ids)) != len(ids) or any(not 0 <= p < self.num_pages for p in ids):
            raise ValueError(f"cannot free pages {ids[:8]}: they are not a set of page ids of this pool.")
        self._free.extend(reversed(ids))
        if len(self._free) > self.num_pages:
            raise RuntimeError("KV cache pages were freed twice; the free list is corrupt.")

    def slots(self, pages: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Flat slot indices of logical positions ``[lo, hi)`` of the request owning ``pages``."""
        pos = torch.arange(lo, hi, dtype=torch.int64)
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)
