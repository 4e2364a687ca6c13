"""CUDA graphs of the cached block step: forward, fused head and commit replayed as one graph launch.

A plan can be replayed when every sequence of the step is a cached block step of the same shape: each request
recomputes only its block (the dual cache between refreshes, or a block-diffusion model after a block's first
step), all blocks have one length, all attention runs through the Triton cached-block kernel in one group, and
nothing needs an extra query or copy (no verification, no classifier-free guidance). Such a batch is padded up
to its bucket (:data:`GRAPH_BATCH_SIZES`): padding requests own no canvas cell (their cells are the store's trash
entry), read no cache (length 0) and commit nothing.

Graphs are keyed by (bucket, block length, fresh tokens per sequence, page-table width rounded up to a power of
two, the plan's code paths, the canvas store's generation). The first step of a key runs eagerly; the second runs
the padded plan eagerly (every kernel compiles and warms up at the graph's shapes); the third captures the graph
and replays it; later ones replay. A plan is copied into the graph's static tensors when it changes (a new batch
or phase), never otherwise: between changes the graph advances its own per-request step counters, like the eager
step. A padded step's result is cut back to the batch's own requests (:func:`unpad`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Protocol

import torch

from ..errors import BackendUnavailableError
from ..kernels.reference import COMMIT_TOPK
from ..models import TokenLayout
from ..policies.base import COUNT_NONE
from .attention_plan import AttentionPlan
from .canvas import CanvasStore
from .plan import COUNTERS, FRESH_AXIS, PAD_AXIS, ROW_AXIS, StepPlan


class EagerRunner(Protocol):
    """What the graphs need of the model runner (which owns them): its device, its KV cache and an eager step."""

    device: torch.device
    cache: object

    def eager(self, plan: StepPlan, store: CanvasStore, rows: torch.Tensor | None = None) -> torch.Tensor: ...


GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)

# Values of the per-request tensors for padding requests (0 / False otherwise).
_REQUEST_FILL = {"block_len": 1, "spb": 1, "timesteps": 1.0, "alg_temp": 1.0, "mode": COMMIT_TOPK,
                 "count_kind": COUNT_NONE, "threshold": 1.0, "factor": 1.0}


def bucket(batch: int) -> int | None:
    return next((b for b in GRAPH_BATCH_SIZES if b >= batch), None)


@dataclasses.dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    plan: StepPlan  # the static plan the graph reads
    out: torch.Tensor
    loaded: StepPlan | None = None


class StepGraphs:
    """The runner's CUDA graphs. ``setting``: EngineConfig.cuda_graphs (None: on for CUDA models; True: a capture
    failure raises; False: never)."""

    def __init__(self, runner: EagerRunner, setting: bool | None) -> None:
        self.runner = runner
        self.setting = setting
        self.enabled = setting is not False and runner.device.type == "cuda"
        self.graphs: dict[tuple, _Graph] = {}
        self._seen: dict[tuple, int] = {}
        self._statics: dict[tuple, StepPlan] = {}
        self._pool = None
        self._generation = -1
        self.failure: str | None = None
        self.captures = 0
        self.replays = 0

    def key(self, plan: StepPlan, store: CanvasStore) -> tuple | None:
        """The graph key of ``plan``, or None when it must run eagerly."""
        if not self.enabled or self.failure is not None or plan.any_cfg or plan.any_verify:
            return None
        kv = plan.layout.kv
        if not isinstance(kv, AttentionPlan) or kv.single or kv.write_rows is not None or len(kv.groups) != 1:
            return None
        group = kv.groups[0]
        if group.kernel is None or group.reads is not None or len(group.members) != plan.batch:
            return None
        width, fresh = plan.width, group.rows.shape[1]
        if plan.num_rows != plan.batch * width or kv.num_tokens != plan.batch * fresh:
            return None  # windows of unequal width: not one block shape
        size = bucket(plan.batch)
        if size is None:
            return None
        table = group.kernel[0].shape[1]
        pages = 1 << max(0, (table - 1).bit_length())
        flags = tuple(getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name.startswith("any_")
                      or f.name in ("fused", "all_raw", "scores", "score_dtype"))
        shapes = tuple((name, tuple(t.shape[1:])) for name, t in sorted(plan.t.items()))
        return size, width, fresh, pages, flags, shapes, store.generation, id(self.runner.cache)

    def run(self, plan: StepPlan, store: CanvasStore) -> torch.Tensor | None:
        """One step of ``plan`` through its graph; None: run it eagerly (no graph for its shape, or not yet). The
        first step of a key runs eagerly; the second runs the padded plan eagerly (every kernel compiles and warms
        up at the graph's shapes: capture must not compile); the third captures the graph and replays it, and
        later ones replay. Returns the step's packed result for ``plan``'s own requests."""
        key = self.key(plan, store)
        if key is None:
            return None
        if key[6] != self._generation:  # the canvas store was reallocated: every graph holds stale addresses
            self.graphs.clear()
            self._statics.clear()
            self._seen.clear()
            self._generation = key[6]
        size, pages = key[0], key[3]
        graph = self.graphs.get(key)
        if graph is None:
            seen = self._seen.get(key, 0) + 1
            self._seen[key] = seen
            if seen == 1:
                return None
            static = self._statics.get(key)
            if static is None:
                static = self._statics[key] = _static_plan(plan, size, key[2], pages)
            _load(static, plan, pages)
            if seen == 2:
                out = self.runner.eager(static, store)
                return self._advance(plan, out, size)
            try:
                graph = self._capture(static, store, plan)
            except Exception as exc:  # noqa: BLE001 - eager steps are always available
                if self.setting:  # asked for explicitly: a setting of the engine that cannot run
                    raise BackendUnavailableError(f"CUDA graph capture (EngineConfig(cuda_graphs=True)) failed: "
                                                  f"{type(exc).__name__}: {exc}") from exc
                self.failure = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"CUDA graph capture failed ({self.failure}); the engine steps eagerly from now on. "
                              f"EngineConfig(cuda_graphs=True) raises the error instead.", RuntimeWarning,
                              stacklevel=4)
                return None
            self.graphs[key] = graph
            del self._statics[key]
        if graph.loaded is not plan:
            _load(graph.plan, plan, pages)
            graph.loaded = plan
        graph.graph.replay()
        self.replays += 1
        return self._advance(plan, graph.out, size)

    @staticmethod
    def _advance(plan: StepPlan, out: torch.Tensor, size: int) -> torch.Tensor:
        """After a padded step: the plan's own counters follow the static ones (an eager step of the plan stays
        right), and the result is cut back to the plan's requests."""
        plan.t["nfe"].add_(1)
        plan.t["block_step"].add_(1)
        return unpad(out, plan, size)

    def _capture(self, static: StepPlan, store: CanvasStore, plan: StepPlan) -> _Graph:
        graph = torch.cuda.CUDAGraph()
        with _capturing():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.cuda.graph(graph, pool=self._pool, stream=side):
                out = self.runner.eager(static, store)
            torch.cuda.current_stream().wait_stream(side)
        self._pool = graph.pool()
        self.captures += 1
        return _Graph(graph, static, out, plan)


def unpad(out: torch.Tensor, plan: StepPlan, size: int) -> torch.Tensor:
    """The packed result of a step padded to ``size`` requests (:func:`.step.pack_outputs`: counters ``[size, K]``,
    then ``[size, W]`` matrices), cut back to ``plan``'s own requests."""
    b, w = plan.batch, plan.width
    if b == size:
        return out
    k = len(COUNTERS)
    counters = out[:size * k].view(size, k)[:b].reshape(-1)
    rest = out[size * k:].view(-1, size, w)[:, :b].reshape(-1)
    return torch.cat((counters, rest))


@contextlib.contextmanager
def _capturing():
    """Capture synchronises the device (once per graph); steps never do. Sync-debug checks are off meanwhile."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _padded_tensors(plan: StepPlan, size: int, fresh: int, pages: int) -> dict[str, torch.Tensor]:
    """``plan``'s tensors extended to ``size`` requests (see the module docstring for what padding holds)."""
    b, w = plan.batch, plan.width
    extra = size - b
    out: dict[str, torch.Tensor] = {}
    for name, x in plan.t.items():
        dev = x.device
        if name in FRESH_AXIS:
            if name == "gather":
                fill = torch.full((extra * fresh,), plan.trash, dtype=x.dtype, device=dev)
            elif name == "positions":
                fill = torch.arange(fresh, dtype=x.dtype, device=dev).repeat(extra)
            else:
                fill = torch.ones(extra * fresh, dtype=x.dtype, device=dev)
        elif name in ROW_AXIS:
            j = torch.arange(w, dtype=torch.int64, device=dev).repeat(extra)
            r = torch.arange(b, size, dtype=torch.int64, device=dev).repeat_interleave(w, output_size=extra * w)
            if name == "row_hidden":
                fill = r * fresh + j
            elif name == "row_req":
                fill = r
            elif name == "row_pad":
                fill = r * w + j
            elif name == "row_exclude":
                fill = torch.full((extra * w, *x.shape[1:]), -1, dtype=x.dtype, device=dev)
            else:
                fill = torch.zeros((extra * w, *x.shape[1:]), dtype=x.dtype, device=dev)
            fill = fill.to(x.dtype)
        elif name in PAD_AXIS:
            value = plan.trash if name == "pad_flat" else 0
            fill = torch.full((extra, *x.shape[1:]), value, dtype=x.dtype, device=dev)
        else:
            fill = torch.full((extra, *x.shape[1:]), _REQUEST_FILL.get(name, 0), dtype=x.dtype, device=dev)
        out[name] = torch.cat((x, fill)) if extra else x
    group = plan.layout.kv.groups[0]
    table, lens, starts = group.kernel
    out["_rows"] = torch.cat((group.rows, torch.arange(b * fresh, size * fresh, device=table.device,
                                                       dtype=group.rows.dtype).view(extra, fresh)))
    wide = torch.zeros((size, pages), dtype=table.dtype, device=table.device)
    wide[:b, :table.shape[1]] = table
    out["_table"] = wide
    out["_lens"] = torch.cat((lens, torch.zeros(extra, dtype=lens.dtype, device=lens.device)))
    out["_starts"] = torch.cat((starts, torch.zeros(extra, dtype=starts.dtype, device=starts.device)))
    return out


def _static_plan(plan: StepPlan, size: int, fresh: int, pages: int) -> StepPlan:
    """A plan of ``size`` requests whose tensors the graph owns (filled by :func:`_load`)."""
    tensors = {k: torch.empty_like(v) for k, v in _padded_tensors(plan, size, fresh, pages).items()}
    rows, table, lens, starts = (tensors.pop(k) for k in ("_rows", "_table", "_lens", "_starts"))
    kv = AttentionPlan.uniform(plan.layout.kv.cache, rows, (table, lens, starts))
    layout = TokenLayout.packed([fresh] * size, block_size=plan.layout.block_size, kv=kv)
    return dataclasses.replace(plan, requests=[], batch=size, num_rows=size * plan.width, layout=layout, t=tensors)


def _load(static: StepPlan, plan: StepPlan, pages: int) -> None:
    """Copy ``plan`` (padded) into the static tensors of a graph (device copies, no synchronisation)."""
    group = static.layout.kv.groups[0]
    size, fresh = static.batch, group.rows.shape[1]
    padded = _padded_tensors(plan, size, fresh, pages)
    for name, dst in static.t.items():
        dst.copy_(padded[name])
    group.rows.copy_(padded["_rows"])
    for dst, key in zip(group.kernel, ("_table", "_lens", "_starts"), strict=True):
        dst.copy_(padded[key])
