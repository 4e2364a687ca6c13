"""Paged KV cache shared by all running requests, and the per-forward plan that attends over it.

Keys and values live in one pool of ``num_pages`` pages of ``page_size`` token slots per layer; a request owns
a list of pages (its page table) covering its whole sequence, allocated when it is admitted and freed when it
finishes or is aborted. Logical position ``p`` of a request lives in slot ``table[p // page_size] * page_size +
p % page_size``. Keys are stored after RoPE. Nothing is allocated per request besides its page list.

A :class:`KVPlan` describes one forward: the fresh tokens of each sequence (packed), the cached positions each
sequence reads, the fresh tokens whose K/V it writes, and which fresh tokens see which (bidirectional,
block-causal for block-diffusion models, and leave-one-out verification queries). The models call
:meth:`KVPlan.attend` for every layer through ``models.layers.attend``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    def free(self, pages: torch.Tensor | None) -> None:
        if pages is None:
            return
        ids = pages.tolist()
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


@dataclass(slots=True)
class SeqPlan:
    """One sequence of a cached forward.

    ``positions``: the fresh tokens' positions: ``num_main`` contiguous main tokens from ``lo``, then the
    verification queries. ``read``: logical ranges of cached positions every fresh token sees. ``write``:
    logical range of main tokens whose K/V are stored (None: nothing). ``block_size``: block-causal attention
    (a token sees the tokens of blocks <= its own, by absolute position). ``hidden``: for each verification query,
    the position of the main token it must not see (it sees every other main token its position allows, and
    itself; main tokens never see verification queries).
    """

    lo: int
    num_main: int
    positions: torch.Tensor
    read: list[tuple[int, int]]
    write: tuple[int, int] | None
    pages: torch.Tensor | None
    block_size: int | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()


class KVPlan:
    """Attention of one forward over fresh tokens and cached K/V (see :class:`SeqPlan`)."""

    def __init__(self, cache: PagedKVCache | None, seqs: list[SeqPlan], device: torch.device) -> None:
        self.cache = cache
        self.cu = [0]
        for s in seqs:
            self.cu.append(self.cu[-1] + s.num_tokens)
        self.read_slots: list[torch.Tensor | None] = []
        self.masks: list[torch.Tensor | None] = []
        write_rows, write_slots = [], []
        for i, s in enumerate(seqs):
            if (s.read or s.write) and (cache is None or s.pages is None):
                raise ValueError("a sequence that reads or writes the KV cache needs a cache and a page table.")
            reads = [cache.slots(s.pages, a, b) for a, b in s.read if b > a] if s.read else []
            self.read_slots.append(torch.cat(reads).to(device) if reads else None)
            if s.write is not None and s.write[1] > s.write[0]:
                a, b = s.write
                write_rows.append(torch.arange(a - s.lo, b - s.lo) + self.cu[i])
                write_slots.append(cache.slots(s.pages, a, b))
            num_read = 0 if self.read_slots[-1] is None else self.read_slots[-1].numel()
            self.masks.append(_mask(s, num_read, device))
        self.write_rows = torch.cat(write_rows).to(device) if write_rows else None
        self.write_slots = torch.cat(write_slots).to(device) if write_slots else None
        # Sequences with the same fresh and cached lengths and no mask attend as one batched SDPA call.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(seqs):
            if self.masks[i] is None:
                num_read = 0 if self.read_slots[i] is None else self.read_slots[i].numel()
                groups.setdefault((s.num_tokens, num_read), []).append(i)
        self.groups: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
        self.single: list[int] = [i for i in range(len(seqs)) if self.masks[i] is not None]
        self.kernel_args: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        use_kernel = _cached_kernel_wanted(device)
        for (n, num_read), members in groups.items():
            if len(members) == 1 and not use_kernel:
                self.single.extend(members)
                continue
            rows = torch.stack([torch.arange(self.cu[i], self.cu[i] + n) for i in members]).to(device)
            reads = torch.stack([self.read_slots[i] for i in members]) if num_read else None
            self.groups.append((members, rows, reads))
            self.kernel_args.append(_kernel_args([seqs[i] for i in members], device) if use_kernel else None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if self.write_rows is not None:
            cache.k[layer].index_copy_(0, self.write_slots, k.index_select(0, self.write_rows).to(cache.k.dtype))
            cache.v[layer].index_copy_(0, self.write_slots, v.index_select(0, self.write_rows).to(cache.v.dtype))
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        for (_members, rows, reads), kernel in zip(self.groups, self.kernel_args, strict=True):
            if kernel is not None and _CACHED_KERNEL_FAILURE is None:
                done = _kernel_attend(cache, layer, q, k, v, rows, kernel)
                if done is not None:
                    out[rows.reshape(-1)] = done.reshape(-1, *q.shape[1:])
                    continue
            kk, vv = k[rows], v[rows]  # [G, n] fresh rows, [G, r] cached slots
            if reads is not None:
                ck, cv = cache.gather(layer, reads.reshape(-1))
                g, r = reads.shape
                kk = torch.cat((ck.view(g, r, *ck.shape[1:]).to(k.dtype), kk), dim=1)
                vv = torch.cat((cv.view(g, r, *cv.shape[1:]).to(v.dtype), vv), dim=1)
            o = F.scaled_dot_product_attention(q[rows].transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                               enable_gqa=gqa)
            out[rows.reshape(-1)] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
        for i in self.single:
            a, b = self.cu[i], self.cu[i + 1]
            kk, vv = k[a:b], v[a:b]
            if self.read_slots[i] is not None:
                ck, cv = cache.gather(layer, self.read_slots[i])
                kk, vv = torch.cat((ck.to(k.dtype), kk)), torch.cat((cv.to(v.dtype), vv))
            qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q[a:b], kk, vv))
            out[a:b] = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self.masks[i],
                                                      enable_gqa=gqa)[0].transpose(0, 1)
        return out


# The Triton kernel of ops.block_attention_cached (one launch per group of equal-shape sequences, the cached
# keys read in place from their pages) serves the plan on CUDA; set when it failed to compile or launch, after
# which the plan stays on SDPA for the process (an explicit DIFFUSE_ATTENTION_BACKEND=triton still raises).
_CACHED_KERNEL_FAILURE: str | None = None


def _cached_kernel_wanted(device: torch.device) -> bool:
    from .. import ops

    choice = os.environ.get(ops.ATTENTION_ENV, "").strip().lower()
    if choice == "triton":
        return True
    if choice not in ("", "auto") or ops.requested_backend() is not None:
        return False
    return device.type == "cuda" and _CACHED_KERNEL_FAILURE is None and importlib.util.find_spec("triton") is not None


def _kernel_args(seqs: list[SeqPlan], device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """(block_table, cache_lens, block_start) for the kernel, when every sequence reads the kernel's pattern:
    [0, lo) and [lo + n, end) around its n fresh tokens from lo (dual), or only [0, lo) (prefix); else None."""
    starts, lens = [], []
    for s in seqs:
        n, lo = s.num_tokens, s.lo
        ranges = [r for r in s.read if r[1] > r[0]]
        if s.num_main != n or (ranges and ranges[0] != (0, lo)) or len(ranges) > 2:
            return None
        if len(ranges) == 2 and ranges[1][0] != lo + n:
            return None
        if s.pages is None:
            return None
        starts.append(lo)
        lens.append(ranges[-1][1] if len(ranges) == 2 else lo)
    width = max(s.pages.numel() for s in seqs)
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, s in enumerate(seqs):
        table[i, : s.pages.numel()] = s.pages.to(torch.int32)
    as32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return table.to(device), as32(lens), as32(starts)


def _kernel_attend(cache: PagedKVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   rows: torch.Tensor, args: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """One group through the Triton cached-block kernel (q and k are rotated already: identity RoPE tables)."""
    global _CACHED_KERNEL_FAILURE
    from .. import ops

    table, lens, starts = args
    g, n = rows.shape
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or d & (d - 1) or not 16 <= d <= 256:
        return None  # shapes the kernel does not take (fp64 tests, odd head dims): the SDPA path
    kc = cache.k[layer].view(cache.num_pages, cache.page_size, *cache.k.shape[2:])
    vc = cache.v[layer].view(cache.num_pages, cache.page_size, *cache.v.shape[2:])
    cos = torch.ones(g, n, d, dtype=torch.float32, device=q.device)
    sin = torch.zeros(g, n, d, dtype=torch.float32, device=q.device)
    try:
        return ops.block_attention_cached(q[rows], k[rows].to(kc.dtype), v[rows].to(vc.dtype), kc, vc, table, lens,
                                          starts, cos, sin, backend="triton").to(q.dtype)
    except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where SDPA runs
        if os.environ.get(ops.ATTENTION_ENV, "").strip().lower() == "triton":
            raise
        _CACHED_KERNEL_FAILURE = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"the Triton cached-attention kernel failed ({_CACHED_KERNEL_FAILURE}); the KV plan uses "
                      f"SDPA from now on.", RuntimeWarning, stacklevel=2)
        return None


def _mask(s: SeqPlan, num_read: int, device: torch.device) -> torch.Tensor | None:
    """Boolean ``[fresh, read + fresh]`` (True = attend), or None when every fresh token sees every key."""
    n, m = s.num_tokens, s.num_main
    pos = s.positions
    if n == m and (s.block_size is None or int(pos[0]) // s.block_size == int(pos[-1]) // s.block_size):
        return None  # no verification queries, and no block boundary among the fresh tokens
    fresh = torch.ones(n, n, dtype=torch.bool)
    if s.block_size is not None:
        blk = pos // s.block_size
        fresh &= blk[:, None] >= blk[None, :]
    if n > m:
        fresh[:m, m:] = False  # main tokens never see verification queries
        fresh[m:, m:] = torch.eye(n - m, dtype=torch.bool)  # a query sees itself, not the other queries
        hidden = s.hidden - s.lo  # the main token each query must not see
        fresh[torch.arange(m, n), hidden] = False
    read = torch.ones(n, num_read, dtype=torch.bool)
    return torch.cat((read, fresh), dim=1).to(device)
