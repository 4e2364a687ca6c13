"""The page manager: which KV-cache pages each request holds (as nano-vllm's block manager), over
:class:`~.kv_cache.PagedKVCache`.

A request that uses a cache gets pages for its whole sequence when it is admitted (two page tables with
classifier-free guidance) and gives them back when it finishes or is aborted. A finished request added with
``retain=True`` keeps its pages (``retained``, least recently used evicted first, and whenever an admission needs
their pages) so that a continuation of the conversation (``continue_from``) takes over those holding the K/V of
their common prefix instead of recomputing it. The pool is allocated at the first request that needs it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ..config import ModelConfig
from .config import EngineConfig
from .kv_cache import PagedKVCache
from .request import Request


class PageManager:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype,
                 device: torch.device, kv_heads: int | None = None) -> None:
        self.model_config, self.config = model_config, config
        self.kv_heads = kv_heads if kv_heads is not None else model_config.num_kv_heads  # this rank's share
        self.dtype, self.device = dtype, device
        self.cache: PagedKVCache | None = None
        self.retained: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # id -> (tokens, pages)

    def _pool(self) -> PagedKVCache:
        if self.cache is None:
            cfg, c = self.model_config, self.config
            self.cache = PagedKVCache(cfg.num_layers, self.kv_heads, cfg.head_dim,
                                      c.kv_cache_tokens // c.page_size, c.page_size, self.dtype, self.device)
        return self.cache

    def allocate(self, req: Request) -> bool:
        """Give ``req`` its KV-cache pages (for its whole sequence); False when too few are free now."""
        if req.cache_mode == "none":
            return True
        cache = self._pool()
        reuse, reused = self._reusable(req)
        streams = 2 if req.params.cfg_scale > 0 else 1
        need = cache.pages_for(req.seq_len) * streams - reuse.numel()
        while need > cache.num_free_pages and self.retained:
            cache.free(self.retained.popitem(last=False)[1][1])  # evict the least recently retained
        if need > cache.num_free_pages:
            if reuse.numel():  # keep the conversation's pages for the next try
                self.retained[req.continue_from] = (req.seq[:reused].clone(), reuse)
            return False
        if req.continue_from is not None:
            self.retained.pop(req.continue_from, None)
        req.pages = torch.cat((reuse, cache.allocate(req.seq_len - reuse.numel() * cache.page_size)))
        if streams == 2:
            req.uncond_pages = cache.allocate(req.seq_len)
        req.reused = reused
        req.cached_upto = reused if req.cache_mode == "block" else 0
        return True

    def _reusable(self, req: Request) -> tuple[torch.Tensor, int]:
        """Pages (whole, leading) of ``req.continue_from`` that ``req`` can take over, and how many leading
        positions of them hold K/V it shares (the common prefix with its prompt, block-aligned for a
        block-diffusion model; for shifted-logit models the last prompt token is always recomputed)."""
        empty = torch.zeros(0, dtype=torch.int64)
        entry = self.retained.get(req.continue_from) if req.continue_from is not None else None
        if entry is None:
            return empty, 0
        tokens, pages = entry
        limit = min(tokens.numel(), req.prompt_len - (1 if self.model_config.shifted_logits else 0))
        differ = np.flatnonzero(tokens.numpy()[:max(limit, 0)] != req.seq.numpy()[:max(limit, 0)])
        n = int(differ[0]) if differ.size else max(limit, 0)
        if req.block_size is not None:
            n -= n % req.block_size
        keep = -(-n // self.cache.page_size)
        del self.retained[req.continue_from]
        self.cache.free(pages[keep:])
        return pages[:keep], n

    def release(self, req: Request, finished: bool = False) -> None:
        """Free ``req``'s pages, or retain them for a continuation (``retain=True``, finished): the K/V valid for
        the final tokens are those before its last block."""
        if self.cache is not None:
            if req.retain and finished and req.pages is not None:
                valid = req.cached_upto if req.cache_mode == "block" else req.spans[-1][0]
                self.retained[req.request_id] = (req.seq[:valid].clone(), req.pages)
                self.retained.move_to_end(req.request_id)
                while len(self.retained) > self.config.max_retained:
                    self.cache.free(self.retained.popitem(last=False)[1][1])
            else:
                self.cache.free(req.pages)
            self.cache.free(req.uncond_pages)
        req.pages = req.uncond_pages = None

    def release_retained(self, request_id: str) -> bool:
        """Free the pages retained for ``request_id``; returns whether there were any."""
        entry = self.retained.pop(request_id, None)
        if entry is not None:
            self.cache.free(entry[1])
        return entry is not None
