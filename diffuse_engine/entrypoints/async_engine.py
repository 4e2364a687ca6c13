"""``AsyncEngine``: the engine for servers. One background thread steps the :class:`Engine`; any number of
coroutines on one asyncio loop submit requests and iterate over their outputs.

    engine = AsyncEngine.from_pretrained("addition")
    async for out in engine.generate("04821+00379=", SamplingParams(gen_length=6), "req-1"):
        print(out.text_delta, end="")

Each :class:`StreamOutput` carries the text and token ids that became final since the previous one (a
diffusion model commits tokens out of order; only the leading run that no later step can change is emitted),
and with ``output_kind="canvas"`` a :class:`CanvasSnapshot` of every step. Leaving the ``async for`` early (or
cancelling the task) aborts the request and frees its slot and KV-cache pages.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ..engine import Engine, EngineConfig, RequestOutput, StepOutput
from ..sampling_params import SamplingParams

OUTPUT_KINDS = ("delta", "canvas")


@dataclass(slots=True)
class CanvasSnapshot:
    """The canvas after one denoising step: ``tokens`` (mask id where still masked), ``masked`` positions,
    ``confidences`` (each position's confidence when committed, 0 where masked), ``committed`` (positions
    committed in this step) and ``revised`` (position, old token, new token) changed by a revision policy."""

    step: int
    block: int
    tokens: list[int]
    masked: list[int]
    confidences: list[float]
    committed: list[int]
    revised: list[tuple[int, int, int]]


@dataclass(slots=True)
class StreamOutput:
    """One update of a streamed request. ``text_delta`` / ``token_ids_delta``: what became final since the
    previous update; ``text``: the final text so far. ``finished`` is set on the last update, with
    ``finish_reason`` and ``output`` (the complete :class:`RequestOutput`)."""

    request_id: str
    text_delta: str
    token_ids_delta: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    canvas: CanvasSnapshot | None = None
    output: RequestOutput | None = None


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    kind: str
    mask_id: int
    stop: list[str] = field(default_factory=list)
    emitted_tokens: int = 0
    text: str = ""
    done: bool = False
    errors: list[BaseException] = field(default_factory=list)
    request_id: str | None = None  # set once the engine holds the request


def _hold_back(text: str, stops: list[str]) -> str:
    """``text`` without a tail that could be the start of a stop string (it may yet be cut from the answer)."""
    keep = len(text)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep]


class AsyncEngine:
    """Steps ``engine`` in a background thread while coroutines add, stream and abort requests.

    The engine is only touched under one lock: ``generate`` adds a request (a ValueError for a bad request is
    raised to the caller at once), the thread runs ``Engine.step`` and hands each request's outputs to its
    coroutine through the loop (``call_soon_threadsafe``). Metrics for ``/metrics``: :meth:`stats`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._pending_aborts: set[str] = set()
        self._plock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._ids = 0
        self.started = time.time()
        self.num_finished = 0
        self.num_aborted = 0
        self.num_failed = 0
        self.num_received = 0
        self.tokens_out = 0
        self.last_step_s = 0.0
        self.error: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model_path: str, device: str | None = None, dtype: str | None = None,
                        engine_config: EngineConfig | None = None) -> AsyncEngine:
        from .llm import LLM

        llm = LLM(model_path, device=device, dtype=dtype, engine_config=engine_config)
        out = cls(llm.engine)
        out.llm = llm
        return out

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopped = False
            self._thread = threading.Thread(target=self._run, name="diffuse-engine-step", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        """Whether the stepping thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False only while steps are failing: the last step raised (its requests failed), or had to be rerun
        request by request because the batched step raised. True again after a step that runs."""
        return self.error is None and self.engine.last_step_error is None

    def shutdown(self) -> None:
        """Stop the stepping thread; unfinished requests are aborted and their streams end with an error."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for rid in list(self._streams):
                if self.engine.abort(rid):
                    self.num_aborted += 1
                self._deliver_error(rid, RuntimeError("the engine shut down before the request finished."))
        llm = getattr(self, "llm", None)
        if llm is not None:  # stops tensor-parallel worker processes
            llm.close()

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                with self._plock:
                    aborts, self._pending_aborts = self._pending_aborts, set()
                for rid in aborts:
                    self._abort_locked(rid)
                busy = self.engine.has_unfinished()
                if busy:
                    t0 = time.perf_counter()
                    try:
                        outputs = self.engine.step()
                    except Exception as exc:  # noqa: BLE001 - a failing step fails its requests, not the server
                        outputs = []
                        self._fail_running(exc)
                    else:
                        self.error = None
                    self.last_step_s = time.perf_counter() - t0
                    for out in outputs:
                        self._dispatch(out)
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _fail_running(self, exc: BaseException) -> None:
        self.error = exc
        for req in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(req.request_id)
            self.num_failed += 1
            self._deliver_error(req.request_id, RuntimeError(f"the engine step failed: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------------------------------- requests
    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None, output_kind: str = "delta", *, retain: bool = False,
                       continue_from: str | None = None,
                       suffix: str | Sequence[int] | None = None) -> AsyncIterator[StreamOutput]:
        """Submit one request and yield its updates until it finishes. ``prompt``: text (encoded with the engine's
        tokenizer) or token ids; ``suffix`` (the same): infilling, the text after the canvas. ``retain`` /
        ``continue_from``: keep this request's KV cache for the next turn of the conversation / reuse an earlier turn's
        (see :meth:`Engine.add_request`; e.g. stop at a tool-call marker, append the tool's result, continue). Raises
        ValueError for a request the engine refuses."""
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}; got {output_kind!r}.")
        loop = asyncio.get_running_loop()
        stream = _Stream(asyncio.Queue(), loop, output_kind, self.engine.model_config.mask_token_id,
                         list((params.stop if params is not None else None) or []))
        # Tokenizing and the lock (held for a whole step) run on a worker thread, never on the event loop.
        try:
            await asyncio.to_thread(self._add, prompt, params, request_id, stream, retain, continue_from, suffix)
        except asyncio.CancelledError:  # the caller left while the worker thread adds the request
            self._leave(stream)
            raise
        self.start()
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.done:  # the consumer left early or was cancelled: abort at the next step boundary
                self._leave(stream)

    def _leave(self, stream: _Stream) -> None:
        """The stream's consumer is gone: abort its request at the next step boundary, whether or not the worker
        thread that adds it has finished (the two meet under ``_plock``: one of them schedules the abort)."""
        with self._plock:
            stream.done = True
            if stream.request_id is not None:
                self._pending_aborts.add(stream.request_id)
        self.start()  # the stepping thread carries out aborts
        self._wake.set()

    def _add(self, prompt: str | Sequence[int], params: SamplingParams | None, request_id: str | None,
             stream: _Stream, retain: bool, continue_from: str | None, suffix=None) -> str | None:
        ids = self._encode(prompt)
        if suffix is not None and not isinstance(suffix, (str, list, tuple)):
            raise ValueError(f"suffix must be text or a list of token ids; got {type(suffix).__name__}.")
        suffix = self._encode(suffix) if suffix else None
        with self._lock:
            if stream.done:  # its caller already left: add nothing (counted as received and aborted)
                self.num_received += 1
                self.num_aborted += 1
                return None
            if request_id is None:
                self._ids += 1
                request_id = f"stream-{self._ids}"
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already streaming.")
            rid = self.engine.add_request(ids, params, request_id, snapshots=stream.kind == "canvas", retain=retain,
                                          continue_from=continue_from, suffix=suffix)
            self._streams[rid] = stream
            self.num_received += 1
            with self._plock:
                stream.request_id = rid
                if stream.done:  # its caller left meanwhile
                    self._pending_aborts.add(rid)
            return rid

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise ValueError("this engine has no tokenizer: give the prompt as token ids.")
            return tok.encode(prompt)
        return list(prompt)

    def abort(self, request_id: str) -> bool:
        """Abort a request now (blocks until the current step ends; its stream ends with an error); returns
        whether it was unfinished."""
        with self._lock:
            return self._abort_locked(request_id)

    def _abort_locked(self, request_id: str) -> bool:
        known = self.engine.abort(request_id)
        if known:
            self.num_aborted += 1
        self._deliver_error(request_id, asyncio.CancelledError(f"request {request_id!r} was aborted."))
        return known

    # ------------------------------------------------------------------------------------------- dispatch
    def _dispatch(self, out: StepOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished and out.output is not None and out.output.finish_reason == "error":
            self.num_failed += 1
            self._deliver_error(out.request_id, RuntimeError(out.output.error))  # this request's step failed
            return
        tokens = out.canvas[: out.stable]
        new_ids = tokens[stream.emitted_tokens:]
        if out.finished:
            text = out.output.text or ""
            self.num_finished += 1
            self.tokens_out += len(out.canvas)
        else:
            text = _hold_back(self._stable_text(tokens), stream.stop)
        delta = text[len(stream.text):] if text.startswith(stream.text) else text
        snapshot = None
        if stream.kind == "canvas":
            snapshot = CanvasSnapshot(out.step, out.block, out.canvas,
                                      [i for i, t in enumerate(out.canvas) if t == stream.mask_id],
                                      out.confidences or [], [p for p, _ in out.committed], out.revised)
        if not (delta or new_ids or out.finished or snapshot is not None):
            return
        stream.emitted_tokens += len(new_ids)
        stream.text = text
        item = StreamOutput(out.request_id, delta, new_ids, text, out.finished,
                            out.output.finish_reason if out.finished else None, snapshot, out.output)
        if out.finished:
            stream.done = True
            self._streams.pop(out.request_id, None)
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening
            self._streams.pop(out.request_id, None)

    def _stable_text(self, tokens: list[int]) -> str:
        text, _ = self.engine._text(tokens)
        # A byte-level tokenizer can end on part of a UTF-8 character: hold it back until it is complete.
        return (text or "").rstrip("\ufffd")

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.done:
            stream.done = True
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
            except RuntimeError:  # its event loop is closed: nobody is listening
                pass

    # -------------------------------------------------------------------------------------------- metrics
    def stats(self) -> dict[str, float]:
        """Queue, running, received / finished / aborted / failed counts (every received request ends as exactly one of
        the last three), output tokens/s since start, mean NFE per step and the
        last step's time."""
        with self._lock:
            eng = self.engine
            elapsed = max(time.time() - self.started, 1e-9)
            return {"waiting": len(eng.waiting), "running": len(eng.running), "finished": self.num_finished,
                    "aborted": self.num_aborted, "failed": self.num_failed,
                    "received": self.num_received, "steps": eng.num_steps, "step_seconds_total": eng.step_seconds,
                    "last_step_seconds": self.last_step_s, "tokens_out": self.tokens_out,
                    "tokens_per_s": self.tokens_out / elapsed,
                    "kv_free_pages": eng.kv_cache.num_free_pages if eng.kv_cache is not None else 0,
                    "kv_total_pages": eng.kv_cache.num_pages if eng.kv_cache is not None else 0}
