"""The scheduler: the waiting and running queues, and which waiting requests join the running batch before each
step (the roofline rule below). It owns the page manager (:mod:`.pages`) and the slots of the persistent batch
(:class:`~.canvas.CanvasStore`): a request holds both from admission to its end.

Requests join and leave between steps (continuous batching). Before a step, waiting requests are considered
oldest first, and the first one that cannot join stops admission (no request is ever overtaken, so none
starves). A request joins when the engine's limits allow it (``max_num_seqs``, ``max_num_batched_tokens``, free
KV-cache pages) and, with ``EngineConfig.scheduling="roofline"``, when the cost model (:mod:`.cost_model`)
says it is worth it:

- below the ridge (memory-bound: the step streams the weights for a few tokens) another request costs almost
  nothing, so it joins;
- compute-bound, a request adds its share of the step's FLOPs: it joins while the step time it adds stays
  below ``knee`` (``EngineConfig.knee``, 0.98) times its proportional share of the current step, i.e. while it
  still raises committed tokens per second (fixed per-step costs are shared); past that knee committed tokens per
  second stop growing while every running request's steps get slower, and admission waits for requests to finish;
- ``max_step_seconds`` bounds the predicted step time (a per-token latency limit for every running request).

``"fcfs"`` admits whatever fits, oldest first (the static limits only).
"""

from __future__ import annotations

import itertools
import time
from collections import deque

from .canvas import CanvasStore
from .config import EngineConfig
from .cost_model import CostModel, StepEstimate
from .pages import PageManager
from .recompute import step_item
from .request import Request, RequestStatus

__all__ = ["Scheduler", "step_item"]


class Scheduler:
    """The queues and admission of an engine with ``config`` (its scheduling, ``max_step_seconds`` and ``knee``
    settings; see the module docstring). ``cost_model``: needed by roofline scheduling."""

    def __init__(self, config: EngineConfig, cost_model: CostModel | None, pages: PageManager,
                 store: CanvasStore) -> None:
        if config.scheduling == "roofline" and cost_model is None:
            raise ValueError("roofline scheduling needs a cost model.")
        self.config, self.cost_model, self.pages, self.store = config, cost_model, pages, store
        self.scheduling, self.max_step_seconds, self.knee = config.scheduling, config.max_step_seconds, config.knee
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.known: set[str] = set()  # ids of unfinished requests

    # ------------------------------------------------------------------------------------------ queues
    def add(self, req: Request) -> None:
        self.known.add(req.request_id)
        self.waiting.append(req)

    def is_finished(self) -> bool:
        return not (self.waiting or self.running)

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running); returns whether it was known. Its slot is free at once."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.release(req)
                    req.status = RequestStatus.ABORTED
                    self.known.discard(request_id)
                    return True
        return False

    def finish(self, req: Request, finished: bool = True) -> None:
        """``req`` leaves the running batch (``finished``: it completed, so its pages may be retained)."""
        self.release(req, finished=finished)
        req.status = RequestStatus.FINISHED
        self.running.remove(req)
        self.known.discard(req.request_id)

    def release(self, req: Request, finished: bool = False) -> None:
        """Free everything ``req`` holds (its slot and KV-cache pages, or retain the pages; see :mod:`.pages`)."""
        self.pages.release(req, finished=finished)
        self.store.release(req)

    # ------------------------------------------------------------------------------------------ admission
    def schedule(self) -> StepEstimate | None:
        """Admit the waiting requests that join the running batch now; returns the predicted cost of the next
        step's batch (None without a cost model)."""
        budget = self.config.max_num_batched_tokens - sum(_tokens(r) for r in self.running)
        slots = self.config.max_num_seqs - len(self.running)
        candidates = list(itertools.islice(self.waiting, max(0, slots)))
        batch = list(self.running)
        current = self.estimate(batch)
        admitted = []
        for req in candidates:
            if self.scheduling == "roofline" and batch and not self._worth(batch, req, current):
                break
            if slots < 1 or _tokens(req) > budget or not self.pages.allocate(req):
                break
            budget -= _tokens(req)
            slots -= 1
            admitted.append(req)
            batch.append(req)
            current = self.estimate(batch)
        now = time.perf_counter()
        for req in admitted:
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.metrics.first_scheduled_time = now
            self.store.admit(req)
            self.running.append(req)
        return current

    def items(self, batch: list[Request]) -> list[tuple[int, int, int]]:
        out = []
        for r in batch:
            item = step_item(r)
            out.append(item)
            if r.params.cfg_scale > 0:
                out.append(item)  # the unconditional copy
        return out

    def estimate(self, batch: list[Request]) -> StepEstimate | None:
        if self.cost_model is None or not batch:
            return None
        return self.cost_model.predict(self.items(batch))

    def _worth(self, batch: list[Request], req: Request, current: StepEstimate | None) -> bool:
        after = self.estimate(batch + [req])
        if current is None or after is None:
            return True
        if self.max_step_seconds is not None and after.seconds > self.max_step_seconds:
            return False
        if after.regime == "memory":
            return True
        # Compute-bound: the request's proportional share of the step is (its tokens / batch tokens) * time.
        tokens = sum(q for q, _, _ in self.items(batch))
        share = current.seconds * sum(q for q, _, _ in self.items([req])) / max(1, tokens)
        return after.seconds - current.seconds < self.knee * share


def _tokens(req: Request) -> int:
    """Tokens ``req`` puts through one forward (its sequence, twice with classifier-free guidance)."""
    return req.seq_len * (2 if req.params.cfg_scale > 0 else 1)
