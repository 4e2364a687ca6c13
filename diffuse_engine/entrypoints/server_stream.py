"""How the server answers over time: the server-sent events of a streamed request (text held back while it may
begin a stop string, one chunk per step with ``stream_canvas``), the response that aborts its request when the
client goes away, and waiting on the engine while listening for a disconnect."""

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..sampling_params import SamplingParams
from .server_input import ApiError, ClientGone, bool_field, scrub
from .server_metrics import note_failure

if TYPE_CHECKING:
    from .async_engine import StreamOutput

T = TypeVar("T")
logger = logging.getLogger("diffuse_engine.server")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def failure(exc: BaseException, status: int, roots: tuple[str, ...] = ()) -> ApiError:
    """The error of a request that the engine accepted but could not finish (shut down, step failed, aborted)."""
    return ApiError(scrub(f"the request failed: {exc or type(exc).__name__}", roots), status=status,
                    kind="server_error")


def safe_end(text: str, stops: list[str]) -> int:
    """How much of ``text`` may be streamed: up to a stop string or a tail that could begin one."""
    end = len(text)
    for stop in stops:
        found = text.find(stop)
        tails = [len(text) - k for k in range(1, len(stop)) if text.endswith(stop[:k])]
        end = min([end, *tails] + ([found] if found >= 0 else []))
    return end


def canvas_json(canvas: Any) -> dict[str, Any]:
    """A :class:`CanvasSnapshot` as the JSON ``canvas`` object of a chunk."""
    return {"step": canvas.step, "block": canvas.block, "tokens": canvas.tokens, "masked": canvas.masked,
            "confidences": canvas.confidences, "committed": canvas.committed,
            "revised": [list(r) for r in canvas.revised]}


async def _wait_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]], awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first (ASGI ``receive`` says so), cancel it and raise
    :class:`ClientGone`."""
    task = asyncio.ensure_future(awaitable)
    listener = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this coroutine is cancelled (server shutdown)
        listener.cancel()
        finished = task.done()
        task.cancel()  # a no-op when it finished
    if finished:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


def cancelling() -> bool:
    """Whether the current task is being cancelled (as opposed to an aborted request's CancelledError)."""
    task = asyncio.current_task()
    return task is not None and bool(getattr(task, "cancelling", lambda: 0)())


def chunker(server: Any, rid: str, chat: bool) -> tuple[Callable[..., str], Callable[[str | None, str | None], dict]]:
    """The SSE event of a chunk and the choice inside it, for a completion or a chat completion."""
    created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        chunk = {"id": rid, "object": kind, "created": created, "model": server.model_name,
                 "choices": [choice] if choice is not None else [], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def choice(text: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    return event, choice


async def guarded(server: Any, agen: AsyncIterator["StreamOutput"], events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE stream of one request: ``events`` (:func:`stream_events` or the draft stream), then ``[DONE]``. A
    failure of the request ends it with an error event (counted as failed; an abort counts as aborted); closing this
    generator aborts the request."""
    try:
        async for event in events:
            yield event
    except (ValueError, RuntimeError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and cancelling():
            raise
        if not isinstance(exc, asyncio.CancelledError):  # an abort counts as aborted
            server.failed += 1
            note_failure(server)
        yield f"data: {json.dumps(failure(exc, 500, server.roots).body())}\n\n"
    finally:
        await agen.aclose()
    yield "data: [DONE]\n\n"


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed request asks for a last chunk with its usage (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def stream_events(server: Any, agen: AsyncIterator["StreamOutput"], first: "StreamOutput", rid: str,
                        chat: bool, body: dict[str, Any], params: SamplingParams) -> AsyncIterator[str]:
    """The chunks of a streamed request of ``server`` (an :class:`OpenAIServer`; run inside :func:`guarded`). Text
    that may begin a stop string is held back until the request finishes (the final text is cut before the stop
    string)."""
    sent, stops, show_canvas = "", params.stop or [], bool_field(body, "stream_canvas")
    event, choice = chunker(server, rid, chat)
    if chat:
        yield event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None, "logprobs": None})
    out = first
    while True:
        extra = {"canvas": canvas_json(out.canvas)} if show_canvas and out.canvas is not None else {}
        end = len(out.text) if out.finished else safe_end(out.text, stops)
        delta = out.text[len(sent):end] if out.text.startswith(sent) else ""
        sent += delta
        if out.finished:
            server.record(out)
            finish = FINISH_REASONS.get(out.finish_reason, out.finish_reason)
            if chat:
                if delta or extra:
                    yield event(choice(delta, None), **extra)
                yield event(choice(None, finish), nfe=out.output.nfe)
            else:
                yield event(choice(delta, finish), nfe=out.output.nfe, **extra)
            if include_usage(body):
                yield event(None, usage=server.usage(out))
            return
        if delta or extra:
            yield event(choice(delta, None), **extra)
        out = await agen.__anext__()


@functools.cache
def closing_streaming_response() -> type:
    """The response class of a stream (built on first use: fastapi is optional): it streams until the client
    disconnects, then closes the body, which aborts the engine request."""
    from fastapi.responses import StreamingResponse

    class ClosingStreamingResponse(StreamingResponse):
        def __init__(self, content: AsyncIterator[str], closer: Callable[[], Awaitable[None]]) -> None:
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.closer = closer

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await until_disconnect(receive, self.stream_response(send))
            except (ClientGone, OSError):  # the client went away
                logger.info("%s: the client disconnected during the stream", scope.get("path"))
            finally:
                await self.body_iterator.aclose()
                await self.closer()  # also when the body never started

    return ClosingStreamingResponse
