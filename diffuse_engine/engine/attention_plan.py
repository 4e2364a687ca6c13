"""Attention of one forward over fresh tokens and paged K/V: planned once per step, run in every layer.

A :class:`SeqPlan` describes one sequence of a forward on the host (plain ints and numpy arrays): the fresh
tokens it recomputes, the cached positions they read, the fresh tokens whose K/V it writes, and which fresh
tokens see which (bidirectional, block-causal for block-diffusion models, leave-one-out verification queries).
:class:`AttentionPlan` turns a list of them into device tensors once (page slots, masks, kernel arguments, in one
upload) and :meth:`AttentionPlan.attend` runs a layer with them: the models call it through
``models.layers.attend`` with q and k *before* RoPE and the step's rotary tables, so that groups of sequences
that fit the Triton cached-block kernel rotate inside the kernel (no identity tables, no extra pass), and only
what goes through SDPA or into the cache is rotated in torch.

Sequences with equal fresh and cached lengths and no mask attend as one group: one kernel launch (CUDA, or
``DIFFUSE_ATTENTION_BACKEND=triton``), or one batched SDPA call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..models.layers import Rotary, apply_rope
from ..ops import backend
from .canvas import upload
from .kv_cache import PagedKVCache


@dataclass(slots=True)
class SeqPlan:
    """One sequence of a cached forward (host values).

    ``positions``: the fresh tokens' positions: ``num_main`` contiguous main tokens from ``lo``, then the
    verification queries. ``read``: logical ranges of cached positions every fresh token sees. ``write``:
    logical range of main tokens whose K/V are stored (None: nothing). ``pages``: the sequence's page table.
    ``block_size``: block-causal attention (a token sees the tokens of blocks <= its own, by absolute position).
    ``hidden``: for each verification query, the position of the main token it must not see (it sees every other
    main token its position allows, and itself; main tokens never see verification queries).
    """

    lo: int
    num_main: int
    positions: np.ndarray
    read: list[tuple[int, int]]
    write: tuple[int, int] | None
    pages: np.ndarray | torch.Tensor | None
    block_size: int | None = None
    hidden: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.int64)
        if self.hidden is not None:
            self.hidden = np.asarray(self.hidden, dtype=np.int64)
        if self.pages is not None:
            self.pages = np.asarray(self.pages, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def slots(self, page_size: int, lo: int, hi: int) -> np.ndarray:
        pos = np.arange(lo, hi, dtype=np.int64)
        return self.pages[pos // page_size] * page_size + pos % page_size


@dataclass(slots=True)
class _Group:
    """Sequences of equal shape that attend together: through the cached-block kernel (``kernel`` holds its
    block_table, cache_lens and block_start; ``fallback`` each member's cached slots, used only if the kernel
    fails), or as one batched SDPA call over equal-length cached slots ``reads``."""

    members: list[int]
    rows: torch.Tensor  # [G, n] fresh rows
    reads: torch.Tensor | None  # [G, r] cached slots
    kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    fallback: list[np.ndarray | None] | None = None
    stored: bool = False  # the fresh K/V are in the cache already: ``reads`` holds every key, in position order


@dataclass(slots=True)
class _Single:
    start: int
    end: int
    reads: torch.Tensor | None
    mask: torch.Tensor | None
    stored: bool = False


class AttentionPlan:
    """The attention of one forward over fresh tokens and the paged cache (see :class:`SeqPlan`)."""

    def __init__(self, cache: PagedKVCache | None, seqs: list[SeqPlan], device: torch.device) -> None:
        self.cache = cache
        self.seqs = seqs  # the host description (what tensor-parallel ranks rebuild the plan from)
        self.cu = [0]
        for s in seqs:
            self.cu.append(self.cu[-1] + s.num_tokens)
        page = cache.page_size if cache is not None else 1
        reads: list[np.ndarray | None] = []
        masks: list[np.ndarray | None] = []
        write_rows, write_slots = [], []
        for i, s in enumerate(seqs):
            if (s.read or s.write) and (cache is None or s.pages is None):
                raise ValueError("a sequence that reads or writes the KV cache needs a cache and a page table.")
            parts = [s.slots(page, a, b) for a, b in s.read if b > a]
            reads.append(np.concatenate(parts) if parts else None)
            if s.write is not None and s.write[1] > s.write[0]:
                a, b = s.write
                write_rows.append(np.arange(a - s.lo, b - s.lo, dtype=np.int64) + self.cu[i])
                write_slots.append(s.slots(page, a, b))
            masks.append(_mask(s, 0 if reads[-1] is None else reads[-1].shape[0]))
        use_kernel = cache is not None and _cached_kernel_wanted(device) and kernel_fits(cache.k[0, :1])
        kernel_shapes: dict[int, list[int]] = {}
        shapes: dict[tuple[int, int], list[int]] = {}
        stored = [False] * len(seqs)
        for i, s in enumerate(seqs):
            if masks[i] is not None:
                continue
            end = _pattern(s)
            if use_kernel and end is not None:
                kernel_shapes.setdefault(s.num_tokens, []).append(i)
                continue
            if end is not None and reads[i] is not None and (s.write is None or s.write[1] <= s.write[0]):
                # A block between refreshes (dual / prefix, or a block-diffusion model's block after its first step):
                # its fresh K/V go to its own slots, which nothing reads before the next refresh (or the next block's
                # first step) rewrites them, and SDPA reads every key in position order from the cache (one gather
                # instead of a gather and a concatenation).
                lo, n = s.lo, s.num_tokens
                write_rows.append(np.arange(n, dtype=np.int64) + self.cu[i])
                write_slots.append(s.slots(page, lo, lo + n))
                reads[i] = s.slots(page, 0, max(end, lo + n))
                stored[i] = True
            shapes.setdefault((s.num_tokens, 0 if reads[i] is None else reads[i].shape[0]), []).append(i)
        self.write_rows = upload(np.concatenate(write_rows), device) if write_rows else None
        self.write_slots = upload(np.concatenate(write_slots), device) if write_slots else None
        self.groups: list[_Group] = []
        grouped = set()
        for n, members in kernel_shapes.items():  # the kernel reads each sequence's own cached length
            grouped.update(members)
            rows = np.stack([np.arange(self.cu[i], self.cu[i] + n, dtype=np.int64) for i in members])
            fallback = [reads[i] for i in members]
            self.groups.append(_Group(members, upload(rows, device), None,
                                      _kernel_args([seqs[i] for i in members], device), fallback))
        for (n, num_read), members in shapes.items():
            if len(members) == 1:
                continue
            grouped.update(members)
            rows = np.stack([np.arange(self.cu[i], self.cu[i] + n, dtype=np.int64) for i in members])
            group_reads = upload(np.stack([reads[i] for i in members]), device) if num_read else None
            self.groups.append(_Group(members, upload(rows, device), group_reads, None, stored=stored[members[0]]))
        self.single = [_Single(self.cu[i], self.cu[i + 1], None if reads[i] is None else upload(reads[i], device),
                               None if masks[i] is None else upload(masks[i], device), stored[i])
                       for i in range(len(seqs)) if i not in grouped]
        self.device = device
        self.num_tokens = self.cu[-1]

    @classmethod
    def uniform(cls, cache: PagedKVCache, rows: torch.Tensor,
                kernel: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> AttentionPlan:
        """A plan of ``rows.shape[0]`` sequences of ``rows.shape[1]`` fresh tokens each, all attending through the
        cached-block kernel with the given (block_table, cache_lens, block_start): the shape a CUDA graph replays
        (its tensors are the graph's static inputs)."""
        plan = cls.__new__(cls)
        g, n = rows.shape
        plan.cache = cache
        plan.seqs = None
        plan.cu = [i * n for i in range(g + 1)]
        plan.write_rows = plan.write_slots = None
        plan.groups = [_Group(list(range(g)), rows, None, kernel)]
        plan.single = []
        plan.num_tokens = g * n
        return plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: Rotary | None = None) -> torch.Tensor:
        """Layer ``layer``: q ``[N, H, D]``, k / v ``[N, KV, D]`` of the fresh tokens, before RoPE when ``rope`` is
        given (rotated here or in the kernel), else already rotated. Writes the planned fresh K/V (post-RoPE) to
        the cache first, then attends."""
        cache = self.cache
        rotated: dict[str, torch.Tensor] = {}

        def qr() -> torch.Tensor:
            if "q" not in rotated:
                rotated["q"] = q if rope is None else apply_rope(q, rope.cos, rope.sin, rope.full_precision)
            return rotated["q"]

        def kr() -> torch.Tensor:
            if "k" not in rotated:
                rotated["k"] = k if rope is None else apply_rope(k, rope.cos, rope.sin, rope.full_precision)
            return rotated["k"]

        if self.write_rows is not None:
            cache.k[layer].index_copy_(0, self.write_slots, kr().index_select(0, self.write_rows).to(cache.k.dtype))
            cache.v[layer].index_copy_(0, self.write_slots, v.index_select(0, self.write_rows).to(cache.v.dtype))
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        for g in self.groups:
            if g.kernel is not None:
                done = _kernel_attend(cache, layer, q, k, v, g.rows, g.kernel, rope) \
                    if backend.failure(_KERNEL_OP) is None else None
                if done is not None:
                    out[g.rows.reshape(-1)] = done.reshape(-1, *q.shape[1:])
                else:  # the kernel failed once: its members attend one by one through SDPA
                    for member, slots in zip(g.members, g.fallback, strict=True):
                        a, b = self.cu[member], self.cu[member + 1]
                        reads = None if slots is None else upload(slots, self.device)
                        out[a:b] = _sdpa_one(cache, layer, qr()[a:b], kr()[a:b], v[a:b], reads, None, gqa)
                continue
            qq = qr()[g.rows]  # [G, n] fresh rows
            if g.reads is not None:
                ck, cv = cache.gather(layer, g.reads.reshape(-1))
                n_g, r = g.reads.shape
                ck, cv = ck.view(n_g, r, *ck.shape[1:]).to(k.dtype), cv.view(n_g, r, *cv.shape[1:]).to(v.dtype)
                kk, vv = (ck, cv) if g.stored else (torch.cat((ck, kr()[g.rows]), dim=1), torch.cat((cv, v[g.rows]), 1))
            else:
                kk, vv = kr()[g.rows], v[g.rows]
            o = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                               enable_gqa=gqa)
            out[g.rows.reshape(-1)] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
        for s in self.single:
            a, b = s.start, s.end
            out[a:b] = _sdpa_one(cache, layer, qr()[a:b], None if s.stored else kr()[a:b], None if s.stored else v[a:b],
                                 s.reads, s.mask, gqa)
        return out


def _sdpa_one(cache: PagedKVCache | None, layer: int, q: torch.Tensor, k: torch.Tensor | None,
              v: torch.Tensor | None, reads: torch.Tensor | None, mask: torch.Tensor | None, gqa: bool) -> torch.Tensor:
    """One sequence: rotated fresh q, and its keys: the cached slots ``reads`` followed by the fresh k / v, or, with
    k and v None, the slots alone (the fresh K/V stored among them)."""
    if reads is not None:
        ck, cv = cache.gather(layer, reads)
        ck, cv = ck.to(q.dtype), cv.to(q.dtype)
        k, v = (ck, cv) if k is None else (torch.cat((ck, k)), torch.cat((cv, v)))
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)


# The Triton kernel of ops.block_attention_cached (one launch per group of equal-fresh-length sequences, the
# cached keys read in place from their pages, RoPE applied in the kernel) serves the plan on CUDA. When it fails to
# compile or launch, the failure is recorded under this op (ops.backend.record_failure) and the plan stays on SDPA
# for the process; an explicit DIFFUSE_ATTENTION_BACKEND=triton still raises.
_KERNEL_OP = "attention_plan_kernel"


def _cached_kernel_wanted(device: torch.device) -> bool:
    choice = backend.requested_attention()
    if choice == "triton":
        return True
    if choice is not None or backend.requested_backend() is not None:
        return False
    return device.type == "cuda" and backend.failure(_KERNEL_OP) is None and backend.triton_runs(device)[0]


def _pattern(s: SeqPlan) -> int | None:
    """The kernel's cache length for ``s`` when it reads the kernel's pattern: [0, lo) and [lo + n, end) around its
    n fresh tokens from lo (dual), or only [0, lo) (prefix); else None. (What a sequence writes is stored by the
    plan before the layer attends, at positions the kernel does not read.)"""
    n, lo = s.num_tokens, s.lo
    ranges = [r for r in s.read if r[1] > r[0]]
    if s.num_main != n or (ranges and ranges[0] != (0, lo)) or len(ranges) > 2 or s.pages is None:
        return None
    if len(ranges) == 2 and ranges[1][0] != lo + n:
        return None
    return ranges[-1][1] if len(ranges) == 2 else lo


def _kernel_args(seqs: list[SeqPlan], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(block_table, cache_lens, block_start) of the kernel for sequences that read its pattern."""
    starts = [s.lo for s in seqs]
    lens = [_pattern(s) for s in seqs]
    width = max(s.pages.shape[0] for s in seqs)
    table = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        table[i, : s.pages.shape[0]] = s.pages
    return (upload(table, device), upload(np.asarray(lens, dtype=np.int32), device),
            upload(np.asarray(starts, dtype=np.int32), device))


def kernel_fits(q: torch.Tensor) -> bool:
    """Whether the cached-block kernel takes q's dtype and head size (else the SDPA path: fp64 tests, odd dims)."""
    d = q.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and not d & (d - 1) and 16 <= d <= 256


def _kernel_attend(cache: PagedKVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   rows: torch.Tensor, args: tuple[torch.Tensor, ...], rope: Rotary | None) -> torch.Tensor | None:
    """One group through the Triton cached-block kernel: q and k as given (pre-RoPE with ``rope``, rotated in the
    kernel; already rotated without)."""
    if not kernel_fits(q):
        return None
    table, lens, starts = args
    kc = cache.k[layer].view(cache.num_pages, cache.page_size, *cache.k.shape[2:])
    vc = cache.v[layer].view(cache.num_pages, cache.page_size, *cache.v.shape[2:])
    cos = sin = None
    if rope is not None:
        cos, sin = rope.cos[rows], rope.sin[rows]
    try:
        return ops.block_attention_cached(q[rows].to(kc.dtype), k[rows].to(kc.dtype), v[rows].to(vc.dtype), kc, vc,
                                          table, lens, starts, cos, sin, backend="triton").to(q.dtype)
    except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where SDPA runs
        if backend.requested_attention() == "triton":
            raise
        why = f"{type(exc).__name__}: {exc}"
        backend.record_failure(_KERNEL_OP, why)
        warnings.warn(f"the Triton cached-attention kernel failed ({why}); the attention plan "
                      f"uses SDPA from now on.", RuntimeWarning, stacklevel=2)
        return None


def _mask(s: SeqPlan, num_read: int) -> np.ndarray | None:
    """Boolean ``[fresh, read + fresh]`` (True = attend), or None when every fresh token sees every key."""
    n, m = s.num_tokens, s.num_main
    pos = s.positions
    if n == m and (s.block_size is None or n == 0 or pos[0] // s.block_size == pos[-1] // s.block_size):
        return None  # no verification queries, and no block boundary among the fresh tokens
    fresh = np.ones((n, n), dtype=bool)
    if s.block_size is not None:
        blk = pos // s.block_size
        fresh &= blk[:, None] >= blk[None, :]
    if n > m:
        fresh[:m, m:] = False  # main tokens never see verification queries
        fresh[m:, m:] = np.eye(n - m, dtype=bool)  # a query sees itself, not the other queries
        fresh[np.arange(m, n), s.hidden - s.lo] = False  # nor the main token it verifies
    read = np.ones((n, num_read), dtype=bool)
    return np.concatenate((read, fresh), axis=1)
