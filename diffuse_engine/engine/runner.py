"""The model runner: runs a step plan on the device (eagerly, or by replaying a captured CUDA graph) and hands back
the step's packed result, and makes the step's one device-to-host copy of it (:meth:`ModelRunner.fetch`).

The fused LM head (:func:`ops.lm_head_stats`: logits never written) serves a plan when the runner's
``fused_head`` allows it (None: on CUDA only) and the plan's requests need nothing it lacks (top-k / top-p,
logits_eos_inf, classifier-free guidance, fp64). An automatic choice that fails to compile or launch falls back,
with one warning, to the unfused head for the rest of the process; an explicit ``fused_head=True`` raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..errors import BackendUnavailableError, TensorParallelError
from ..models import DiffusionLM
from . import step as device_step
from .canvas import CanvasStore, upload
from .graphs import StepGraphs
from .kv_cache import PagedKVCache
from .plan import StepPlan


class ModelRunner:
    def __init__(self, model: DiffusionLM, fused_head: bool | None = None, cache: PagedKVCache | None = None,
                 cuda_graphs: bool | None = None) -> None:
        self.model = model
        self.config = model.config
        self.device = model.device
        self.fused_head = fused_head
        self.cache = cache
        self.graphs = StepGraphs(self, cuda_graphs)
        cfg = model.config
        self.mask_id, self.eos_id, self.eot_id = cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id
        self._host: torch.Tensor | None = None  # pinned buffer of the step's copy (CUDA)
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None

    def fuse(self) -> bool:
        """Whether plans may use the fused head (their own requests decide the rest)."""
        if self.fused_head is False or self.model.dtype == torch.float64:
            return False
        return self.fused_head is True or self.device.type == "cuda"

    @torch.inference_mode()
    def run(self, plan: StepPlan, store: CanvasStore,
            rows: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
        """One step of ``plan`` on the device; returns the packed result (:func:`step.pack_outputs`), still on the
        device (nothing here waits for it). ``rows``: called for an eager step, the window rows the head computes
        (the step's candidates; None: all of them). A replayed graph computes every row."""
        replay = self.graphs.run(plan, store)
        if replay is not None:
            return replay
        return self.eager(plan, store, rows() if rows is not None else None)

    def eager(self, plan: StepPlan, store: CanvasStore, rows: torch.Tensor | None = None) -> torch.Tensor:
        hidden = device_step.forward(self.model, plan, store, self.mask_id)
        stats = self._head(plan, hidden, rows)
        return device_step.decide(self.model, plan, store, hidden, stats, self.mask_id, self.eos_id, self.eot_id,
                                  rows)

    def _head(self, plan: StepPlan, hidden: torch.Tensor, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if not plan.fused:
            return device_step.head(self.model, plan, hidden, self.eos_id, rows)
        try:
            return device_step.head(self.model, plan, hidden, self.eos_id, rows)
        except (ValueError, TensorParallelError):
            raise
        except Exception as exc:  # noqa: BLE001 - automatic choice must not fail where the unfused head runs
            if self.fused_head:  # asked for explicitly: a setting of the engine that cannot run
                raise BackendUnavailableError(f"the fused LM head (EngineConfig(fused_head=True)) failed: "
                                              f"{type(exc).__name__}: {exc}") from exc
            self.fused_head = False
            warnings.warn(f"the fused LM head failed ({type(exc).__name__}: {exc}); using the unfused head from now "
                          f"on. EngineConfig(fused_head=True) raises the error instead.", RuntimeWarning, stacklevel=3)
            plan.fused = False
            return device_step.head(self.model, plan, hidden, self.eos_id, rows)

    def candidate_rows(self, plan: StepPlan, store: CanvasStore) -> torch.Tensor | None:
        """The window rows that are candidates this step (still masked in the host mirror, which is exact between
        steps), as indices into the plan's rows, for the head to compute only those; None: every row (all are
        candidates, or guidance needs the plan's row order)."""
        if plan.any_cfg:
            return None
        masked = store.host_tokens[plan.host_slot, plan.host_pos] == self.mask_id
        if masked.all():
            return None
        return upload(np.flatnonzero(masked), store.device)

    def fetch(self, result: torch.Tensor) -> np.ndarray:
        """The step's one device-to-host copy: asynchronous into pinned memory, then the wait for it."""
        if result.device.type != "cuda":
            return result.numpy()
        n = result.numel()
        if self._host is None or self._host.numel() < n:
            self._host = torch.empty(max(n, 1024), dtype=torch.int32, pin_memory=True)
        self._host[:n].copy_(result, non_blocking=True)
        self._copied.record()
        mode = torch.cuda.get_sync_debug_mode()  # the planned wait: exempt from sync-debug checks
        torch.cuda.set_sync_debug_mode(0)
        try:
            self._copied.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        return self._host[:n].numpy()
