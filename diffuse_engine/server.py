"""``diffuse-engine serve``: an OpenAI-compatible HTTP server on top of :class:`AsyncEngine`.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true``: server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Besides the OpenAI fields (``model``,
``prompt`` / ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options``, ``n`` = 1) a request may set any :class:`SamplingParams` field (``steps``, ``block_length``,
``policy``, ``threshold``, ``cache``, ...; the ``openai`` client's ``extra_body``) and ``stream_canvas: true``:
a chunk per denoising step, with its ``canvas`` (step, block, tokens, masked, confidences, committed, revised).
Omitted fields take the model folder's generation defaults (:meth:`LLM.default_params`).
``usage.completion_tokens`` counts the whole canvas (a diffusion model decodes all ``max_tokens``, EOS padding
included); responses also report ``nfe``. Unknown fields are ignored; invalid values give a 4xx with an OpenAI
error body. A client that disconnects aborts its request (slot and KV pages are freed at the next step).
fastapi and uvicorn are imported only when a server is built (``pip install "diffuse-engine[serve]"``).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .sampling_params import SamplingParams

if TYPE_CHECKING:  # fastapi is optional: imported by build_app
    from fastapi import FastAPI, Request

    from .async_engine import AsyncEngine, StreamOutput

T = TypeVar("T")
DEFAULT_GEN_LENGTH = 128
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
# SamplingParams fields a request may set by name (gen_length comes from max_tokens, stop is checked here).
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("gen_length", "stop"))


class ApiError(Exception):
    """An invalid request: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _failure(exc: BaseException, status: int) -> ApiError:
    """The error of a request that the engine accepted but could not finish (shut down, step failed, aborted)."""
    return ApiError(f"the request failed: {exc or type(exc).__name__}", status=status, kind="server_error")


class _Disconnected(Exception):
    """The client went away before the answer was ready."""


def _param_of(exc: Exception) -> str | None:
    """The request field a ValueError of SamplingParams / the engine is about."""
    message = str(exc)
    word = message.split(" ", 1)[0].strip("(:,.'\"")
    if word in SAMPLING_FIELDS:
        return word
    return "max_tokens" if "gen_length" in message else word if word in ("prompt", "stop") else None


def _int_or_none(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ApiError(f"{name} must be an integer >= 1; got {value!r}.", name)
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(f"{name} must be a boolean; got {value!r}.", name)
    return bool(value)


def parse_prompt(prompt: Any) -> str | list[int]:
    """The one prompt of a completions request: a string, a list of one string, token ids or a list of one list
    of token ids."""
    if prompt is None:
        raise ApiError("prompt is required.", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError("prompt must not be empty.", "prompt")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError("prompt must not be empty.", "prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(f"only one prompt per request is supported; got {len(prompt)}.", "prompt")
    raise ApiError("prompt must be a string, a list of one string or a list of integer token ids; got "
                   f"{type(prompt).__name__}.", "prompt")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as ``{"role", "content"}`` dicts of strings (text content parts are joined)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(f"messages (required) must be a non-empty list of {{role, content}} objects; got {messages!r}.",
                       "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(f"messages[{i}] must be an object with role and content.", "messages")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise ApiError(f"messages[{i}].role must be a non-empty string; got {role!r}.", "messages")
        content = "" if content is None and role == "assistant" else content
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"messages[{i}].content: only text content parts are supported.", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string; got {type(content).__name__}.", "messages")
        out.append({"role": role, "content": content})
    return out


class OpenAIServer:
    """The state behind the routes: the engine, the served model name and request counters."""

    def __init__(self, engine: "AsyncEngine", model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.llm = getattr(engine, "llm", None)  # set by AsyncEngine.from_pretrained: the folder's defaults
        self.created = int(time.time())
        self.nfe_total = self.nfe_count = 0  # over finished requests, for diffuse_nfe_per_request

    def check_common(self, body: dict[str, Any], chat: bool) -> None:
        """Reject a request for another model (404), with n > 1, or asking for what this server cannot do."""
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(f"model must be a string; got {model!r}.", "model")
        if model is not None and model != self.model_name:
            raise ApiError(f"The model `{model}` does not exist; this server serves `{self.model_name}`.", "model",
                           status=404)
        if _int_or_none(body, "n") not in (None, 1):
            raise ApiError(f"n > 1 is not supported; got n={body['n']}.", "n")
        for name in ("stream", "stream_canvas"):
            _bool(body, name)
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
            raise ApiError("logprobs are not supported.", "logprobs")
        for name, fine in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, ""))):
            if not chat and body.get(name) not in fine:
                raise ApiError(f"{name}={body[name]!r} is not supported.", name)

    def sampling_params(self, body: dict[str, Any], chat: bool) -> SamplingParams:
        """SamplingParams from the request: the model folder's defaults, overridden by the given fields."""
        overrides = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
        for name in (("max_completion_tokens",) if chat else ()) + ("max_tokens",):
            if (value := _int_or_none(body, name)) is not None:
                overrides["gen_length"] = value
                break
        stop = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop")
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(f"stop must be a non-empty string or a list of them; got {stop!r}.", "stop")
        if stop:
            overrides["stop"] = stop
        try:
            if self.llm is not None:
                return self.llm.default_params(**overrides)
            return SamplingParams(**{"gen_length": DEFAULT_GEN_LENGTH, **overrides})
        except (ValueError, TypeError) as exc:
            raise ApiError(f"invalid sampling parameters: {exc}", _param_of(exc)) from None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render the conversation with the model's chat template (as ``generate --chat`` does)."""
        tok = self.engine.engine.tokenizer
        if tok is None or not tok.has_chat_template:
            raise ApiError(f"the model `{self.model_name}` has no chat template; use /v1/completions.", "messages")
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise ApiError(str(exc), "messages") from None

    async def start(self, prompt: str | list[int], params: SamplingParams, request_id: str, canvas: bool,
                    request: "Request") -> tuple[AsyncIterator["StreamOutput"], "StreamOutput"]:
        """Submit the request and wait for its first update (a refused request raises :class:`ApiError`).
        ``canvas``: an update per step (a stream's first one comes after one step, not when text is final)."""
        agen = self.engine.generate(prompt, params, request_id, output_kind="canvas" if canvas else "delta")
        try:
            return agen, await until_disconnect(request.receive, agen.__anext__())
        except BaseException as exc:
            await agen.aclose()
            if isinstance(exc, ValueError):
                raise ApiError(str(exc), _param_of(exc)) from None
            raise

    def record(self, out: "StreamOutput") -> None:
        """Count a finished request's NFE for ``diffuse_nfe_per_request``."""
        if out.finished:
            self.nfe_total += out.output.nfe
            self.nfe_count += 1

    async def collect(self, agen: AsyncIterator["StreamOutput"], last: "StreamOutput") -> "StreamOutput":
        """Drain a request's updates (``last``: the first one); returns the last (finished) one."""
        try:
            while not last.finished:
                last = await agen.__anext__()
        finally:
            await agen.aclose()
        self.record(last)
        return last

    def usage(self, out: "StreamOutput") -> dict[str, int]:
        """OpenAI ``usage`` of a finished request (completion tokens: the whole canvas)."""
        prompt, completion = len(out.output.prompt_token_ids), len(out.output.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def stream(self, agen: AsyncIterator["StreamOutput"], first: "StreamOutput", rid: str, chat: bool,
                     body: dict[str, Any], params: SamplingParams) -> AsyncIterator[str]:
        """The SSE events of a streamed request; closing this generator aborts the request. Text that may begin a
        stop string is held back until the request finishes (the final text is cut before the stop string)."""
        created, sent, stops, show_canvas = int(time.time()), "", params.stop or [], _bool(body, "stream_canvas")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any] | None, **extra: Any) -> str:
            chunk = {"id": rid, "object": kind, "created": created, "model": self.model_name,
                     "choices": [choice] if choice is not None else [], **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        def choice(text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None, "logprobs": None})
            out = first
            while True:
                extra = {"canvas": canvas_json(out.canvas)} if show_canvas and out.canvas is not None else {}
                end = len(out.text) if out.finished else _safe_end(out.text, stops)
                delta = out.text[len(sent):end] if out.text.startswith(sent) else ""
                sent += delta
                if out.finished:
                    self.record(out)
                    finish = FINISH_REASONS.get(out.finish_reason, out.finish_reason)
                    if chat:
                        if delta or extra:
                            yield event(choice(delta, None), **extra)
                        yield event(choice(None, finish), nfe=out.output.nfe)
                    else:
                        yield event(choice(delta, finish), nfe=out.output.nfe, **extra)
                    if include_usage:
                        yield event(None, usage=self.usage(out))
                    break
                if delta or extra:
                    yield event(choice(delta, None), **extra)
                out = await agen.__anext__()
        except (ValueError, RuntimeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelling():
                raise
            yield f"data: {json.dumps(_failure(exc, 500).body())}\n\n"
        finally:
            await agen.aclose()
        yield "data: [DONE]\n\n"


def _safe_end(text: str, stops: list[str]) -> int:
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
    :class:`_Disconnected`."""
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
    raise _Disconnected()


def _cancelling() -> bool:
    """Whether the current task is being cancelled (as opposed to an aborted request's CancelledError)."""
    task = asyncio.current_task()
    return task is not None and bool(getattr(task, "cancelling", lambda: 0)())


def metrics_text(server: OpenAIServer) -> str:
    """The Prometheus exposition of the engine's counters and gauges."""
    s = server.engine.stats()
    nfe = server.nfe_total / server.nfe_count if server.nfe_count else 0.0
    rows = [
        ("diffuse_requests_waiting", "gauge", "Requests queued for a slot.", s["waiting"]),
        ("diffuse_requests_running", "gauge", "Requests being decoded.", s["running"]),
        ("diffuse_requests_finished_total", "counter", "Requests finished.", s["finished"]),
        ("diffuse_requests_aborted_total", "counter", "Requests aborted (cancelled or disconnected).", s["aborted"]),
        ("diffuse_output_tokens_total", "counter", "Canvas tokens of finished requests.", s["tokens_out"]),
        ("diffuse_output_tokens_per_second", "gauge", "Output tokens per second since start.", s["tokens_per_s"]),
        ("diffuse_steps_total", "counter", "Engine steps (one forward each).", s["steps"]),
        ("diffuse_step_seconds_total", "counter", "Seconds spent in engine steps.", s["step_seconds_total"]),
        ("diffuse_step_seconds_last", "gauge", "Duration of the last engine step.", s["last_step_seconds"]),
        ("diffuse_nfe_per_request", "gauge", "Mean forward evaluations per finished request.", nfe),
        ("diffuse_kv_pages_free", "gauge", "Free KV-cache pages.", s["kv_free_pages"]),
        ("diffuse_kv_pages_total", "gauge", "KV-cache pages (0 until a request uses the cache).", s["kv_total_pages"]),
    ]
    lines = []
    for name, kind, text, value in rows:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
    estimate = getattr(server.engine.engine, "last_estimate", None)  # the cost model's view of the last step
    regime = s.get("regime", getattr(estimate, "regime", None))  # only when the engine reports one
    if regime in ("memory", "compute"):
        lines += ["# HELP diffuse_step_regime Whether the last step was memory- or compute-bound.",
                  "# TYPE diffuse_step_regime gauge"]
        lines += [f'diffuse_step_regime{{regime="{r}"}} {int(r == regime)}' for r in ("memory", "compute")]
    return "\n".join(lines) + "\n"


def build_app(engine: "AsyncEngine", model_name: str) -> "FastAPI":
    """The FastAPI app serving ``engine`` as ``model_name``. Its lifespan starts the engine's stepping thread
    and shuts the engine down."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = OpenAIServer(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="diffuse-engine", lifespan=lifespan)
    app.state.server = server

    class ClosingStreamingResponse(StreamingResponse):
        """Streams until the client disconnects, then closes the body (which aborts the engine request)."""

        def __init__(self, content: AsyncIterator[str], closer: Callable[[], Awaitable[None]]) -> None:
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.closer = closer

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await until_disconnect(receive, self.stream_response(send))
            except (_Disconnected, OSError):  # the client went away
                pass
            finally:
                await self.body_iterator.aclose()
                await self.closer()  # also when the body never started

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ApiError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code)
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def read_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(f"the request body must be a JSON object; got {type(body).__name__}.")
        return body

    async def complete(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        server.check_common(body, chat)
        if chat:
            prompt: str | list[int] = server.chat_prompt(parse_messages(body.get("messages")))
        else:
            prompt = parse_prompt(body.get("prompt"))
        params = server.sampling_params(body, chat)
        stream = _bool(body, "stream")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            agen, first = await server.start(prompt, params, rid, stream, request)
            if stream:
                return ClosingStreamingResponse(server.stream(agen, first, rid, chat, body, params), agen.aclose)
            last = await until_disconnect(request.receive, server.collect(agen, first))
        except _Disconnected:
            return Response(status_code=499)  # nobody reads it
        except (RuntimeError, asyncio.CancelledError) as exc:
            if _cancelling():
                raise
            raise _failure(exc, 500) from None
        text = {"message": {"role": "assistant", "content": last.text}} if chat else {"text": last.text}
        choice = {"index": 0, **text, "finish_reason": FINISH_REASONS.get(last.finish_reason, last.finish_reason),
                  "logprobs": None}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": [choice],
                             "usage": server.usage(last), "nfe": last.output.nfe})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "diffuse-engine"}]}

    @app.get("/health")
    async def health() -> Response:
        problem = (f"an engine step failed: {engine.error}" if engine.error is not None else
                   None if engine.is_running else "the engine thread is not running.")
        return JSONResponse({"status": "ok"} if problem is None else {"status": "error", "message": problem},
                            200 if problem is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await asyncio.to_thread(metrics_text, server)  # stats() waits for the engine lock (a step)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Register ``diffuse-engine serve``."""
    cmd = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                         description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics).")
    cmd.add_argument("--model", required=True, metavar="DIR", help="model folder (Hugging Face layout) or zoo name")
    cmd.add_argument("--served-model-name", metavar="NAME", help="the model id of the API (default: folder name)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    cmd.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    cmd.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    cmd.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's on CUDA, fp32 on CPU)")
    cmd.add_argument("--max-num-seqs", type=int, help="requests decoded per step (default 64)")
    cmd.add_argument("--kv-cache-tokens", type=int, help="token slots of the paged KV cache (default 16384)")
    cmd.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    cmd.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """``serve``: load the model and run uvicorn until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise RuntimeError(f"serve needs fastapi and uvicorn ({exc}); pip install 'diffuse-engine[serve]'") from None
    from .async_engine import AsyncEngine
    from .cli import UsageError, _check_device
    from .engine import EngineConfig

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535; got {args.port}.")
    limits = {k: getattr(args, k) for k in ("max_num_seqs", "kv_cache_tokens") if getattr(args, k) is not None}
    engine = AsyncEngine.from_pretrained(args.model, device=_check_device(args.device), dtype=args.dtype,
                                         engine_config=EngineConfig(**limits))
    app = build_app(engine, args.served_model_name or Path(str(args.model).rstrip("/")).name)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it shut down gracefully on
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    return 0
