"""The engine's limits and switches (:class:`EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULING = ("roofline", "fcfs")
DISTRIBUTED_INIT = ("spawn", "env")  # how tensor-parallel ranks start: by the engine, or by a launcher (torchrun)


@dataclass(slots=True)
class EngineConfig:
    """Batch limits. ``max_num_seqs``: requests per step; ``max_num_batched_tokens``: tokens per forward
    (prompt + canvas, doubled for classifier-free guidance). ``fused_head``: compute the LM head and the
    sampling statistics in one kernel that never writes logits (:func:`ops.lm_head_stats`) when a step's
    requests allow it (no top-k / top-p, no logits_eos_inf, no classifier-free guidance); None = on CUDA
    only, False = never, True = also on the CPU (through the torch path or, under TRITON_INTERPRET=1 with
    DIFFUSE_BACKEND=triton, the Triton kernel). ``page_size`` and ``kv_cache_tokens``: the paged KV cache
    shared by every request that uses one (allocated at the first such request): pages of ``page_size`` token
    slots, ``kv_cache_tokens`` slots in all; a request is admitted when pages for its whole sequence are free.
    ``max_retained``: finished requests whose pages are kept for a continuation (``add_request(retain=True)``),
    least recently used evicted first (and whenever an admission needs their pages).
    ``scheduling``: ``"roofline"`` (admit while the cost model says another request raises committed tokens
    per second: always below the ridge, up to the knee above it; see :mod:`.scheduler`) or ``"fcfs"``
    (whatever fits). ``knee``: with roofline scheduling, a request joins a compute-bound batch only while the step
    time it adds is below ``knee`` times its proportional share of the step (1.0: any throughput gain; lower values
    trade throughput for shorter steps). ``max_step_seconds``: a bound on the predicted step time (None: none).
    ``calibrate``: measure the device's ceilings once (cached on disk) instead of using its preset; None = on CUDA only.
    ``cuda_graphs``: replay the cached block step (forward, head and commit) from CUDA graphs captured at bucketed
    batch sizes (:data:`.graphs.GRAPH_BATCH_SIZES`), padding a batch up to its bucket; None = on for CUDA models,
    False = never, True = required (a capture failure raises instead of falling back to eager with a warning). CPU
    models always step eagerly: True on a CPU model is refused when the engine starts.
    ``tensor_parallel_size``: ranks the model is sharded over (:mod:`diffuse_engine.distributed`; the model must be
    started that way: ``LLM(path, tensor_parallel_size=N)``); ``distributed_init``: ``"spawn"`` (the engine starts
    its worker processes) or ``"env"`` (a launcher such as torchrun started every rank); ``distributed_timeout_s``:
    how long rank 0 waits on a rank in a collective (or for the ranks to start) before it fails the engine's
    requests with a :class:`~diffuse_engine.errors.TensorParallelError`."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 65536
    fused_head: bool | None = None
    page_size: int = 16
    kv_cache_tokens: int = 16384
    max_retained: int = 64
    scheduling: str = "roofline"
    max_step_seconds: float | None = None
    calibrate: bool | None = None
    cuda_graphs: bool | None = None
    knee: float = 0.98
    tensor_parallel_size: int = 1
    distributed_init: str = "spawn"
    distributed_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}; got {self.scheduling!r}.")
        if self.max_step_seconds is not None and (isinstance(self.max_step_seconds, bool)
                                                  or not isinstance(self.max_step_seconds, (int, float))
                                                  or not self.max_step_seconds > 0):
            raise ValueError(f"max_step_seconds must be a positive number or None; got {self.max_step_seconds!r}.")
        if isinstance(self.knee, bool) or not isinstance(self.knee, (int, float)) or not 0 < self.knee <= 1:
            raise ValueError(f"knee must be a number in (0, 1]; got {self.knee!r}.")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True, False or None; got {self.cuda_graphs!r}.")
        if self.distributed_init not in DISTRIBUTED_INIT:
            raise ValueError(f"distributed_init must be one of {', '.join(DISTRIBUTED_INIT)}; got "
                             f"{self.distributed_init!r}.")
        t = self.distributed_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"distributed_timeout_s must be a positive number of seconds; got {t!r}.")
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "kv_cache_tokens", "max_retained",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
