"""Which waiting requests join the running batch before each step: the roofline scheduler.

Requests join and leave between steps (continuous batching). Before a step, waiting requests are considered
oldest first, and the first one that cannot join stops admission (no request is ever overtaken, so none
starves). A request joins when the engine's limits allow it (``max_num_seqs``, ``max_num_batched_tokens``, free
KV-cache pages) and, with ``EngineConfig.scheduling="roofline"``, when the cost model (:mod:`.cost_model`)
says it is worth it:

- below the ridge (memory-bound: the step streams the weights for a few tokens) another request costs almost
  nothing, so it joins;
- compute-bound, a request adds its share of the step's FLOPs: it joins while the step time it adds stays
  below ``knee`` (0.98) times its proportional share of the current step, i.e. while it still raises
  committed tokens per second (fixed per-step costs are shared); past that knee committed tokens per second
  stop growing while every running request's steps get slower, and admission waits for requests to finish;
- ``max_step_seconds`` bounds the predicted step time (a per-token latency limit for every running request).

``"fcfs"`` admits whatever fits, oldest first (the static limits only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .cost_model import CostModel, StepEstimate
from .request import Request

SCHEDULING = ("roofline", "fcfs")


@dataclass(slots=True)
class Decision:
    """One admission round: who joined, and the predicted cost of the next step's batch (None without a
    cost model)."""

    admitted: list[Request]
    estimate: StepEstimate | None


def step_item(req: Request) -> tuple[int, int, int]:
    """The steady-state work of one step of ``req``: (tokens recomputed, cached keys read, LM-head rows)."""
    start, end = req.block_span
    block = end - start
    mode = req.cache_mode
    if mode == "none":
        q, ctx = req.seq_len, 0
    elif mode == "prefix":
        q, ctx = req.seq_len - start, start
    elif mode == "dual":
        q, ctx = block, req.seq_len - block
    else:  # exact block cache
        q, ctx = block, start
    rows = max(1, min(q, req.block_masked_count))
    return q, ctx, rows


class Scheduler:
    """Admission by the roofline (see the module docstring). ``knee``: a request joins a compute-bound batch
    only while the step time it adds is below ``knee`` times its proportional share (1.0: any throughput gain;
    lower values trade throughput for shorter steps)."""

    def __init__(self, cost_model: CostModel | None, *, scheduling: str = "roofline",
                 max_step_seconds: float | None = None, knee: float = 0.98) -> None:
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}; got {scheduling!r}.")
        if scheduling == "roofline" and cost_model is None:
            raise ValueError("roofline scheduling needs a cost model.")
        if max_step_seconds is not None and not max_step_seconds > 0:
            raise ValueError(f"max_step_seconds must be positive; got {max_step_seconds!r}.")
        if not 0 < knee <= 1:
            raise ValueError(f"knee must be in (0, 1]; got {knee!r}.")
        self.cost_model = cost_model
        self.scheduling = scheduling
        self.max_step_seconds = max_step_seconds
        self.knee = knee

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

    def admit(self, waiting: list[Request], running: list[Request], fits: Callable[[Request], bool]) -> Decision:
        """The waiting requests (oldest first) that join ``running`` now; ``fits(req)`` checks (and takes) the
        engine's static resources for ``req`` and is called only for requests the cost rule accepts."""
        admitted: list[Request] = []
        batch = list(running)
        current = self.estimate(batch)
        for req in waiting:
            if self.scheduling == "roofline" and batch and not self._worth(batch, req, current):
                break
            if not fits(req):
                break
            admitted.append(req)
            batch.append(req)
            current = self.estimate(batch)
        return Decision(admitted, current)

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
