"""The OpenAI-compatible HTTP server on top of :class:`AsyncEngine` (``diffuse-engine serve``: :mod:`.server_cli`).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` and ``POST /v1/fim/completions`` (``stream: true``:
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Besides the OpenAI fields
(``model``, ``prompt`` / ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options``, ``n`` = 1) a request may set any :class:`SamplingParams` field (``steps``, ``block_length``,
``policy``, ``threshold``, ``cache``, ...; the ``openai`` client's ``extra_body``) and ``stream_canvas: true``:
a chunk per denoising step, with its ``canvas`` (step, block, tokens, masked, confidences, committed, revised);
``diffusing: true``: a chunk per step holding the whole current draft (:mod:`.server_draft`). ``reasoning_effort``
or ``effort`` (``low`` / ``medium`` / ``high`` / a number in [0, 1]) picks the decoding knob
(:mod:`diffuse_engine.policies.effort`); the fields given explicitly win over it.
Infilling: a completions request with a ``suffix`` (as OpenAI's API once had), or a fill-in-the-middle request
(``prompt``, ``suffix`` required, ``max_tokens``: the middle's length), writes the middle between the two
(full-attention models only; the text returned is the middle).
Omitted fields take the model folder's generation defaults (:meth:`LLM.default_params`).
``usage.completion_tokens`` counts the whole canvas (a diffusion model decodes all ``max_tokens``, EOS padding
included); responses also report ``nfe``. Unknown fields are ignored; invalid values give a 4xx with an OpenAI
error body. A client that disconnects aborts its request (slot and KV pages are freed at the next step).

Hardening (:mod:`.server_input`): an optional API key (``Authorization: Bearer``, 401), a body size limit (413)
and body read timeout (408), JSON checks (400, also for deeply nested JSON), chat roles and content types checked
by field, chat templates rendered and prompts tokenized on worker threads, special-token strings in message
contents tokenized as text (:meth:`Tokenizer.encode_chat`), and error bodies that name no server file.
``/health`` and ``/metrics``: :mod:`.server_metrics`; streams: :mod:`.server_stream`.
fastapi and uvicorn are imported only when a server is built (``pip install "diffuse-engine[serve]"``).
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..policies.effort import params_with_effort
from ..sampling_params import SamplingParams
from .server_draft import draft_events
from .server_input import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    ApiError,
    ClientGone,
    bool_field,
    brief,
    check_api_key,
    check_content_type,
    diffusing_field,
    effort_field,
    int_field,
    parse_json,
    parse_messages,
    parse_prompt,
    parse_suffix,
    read_body,
    scrub,
)
from .server_metrics import health_status, metrics_text, note_failure
from .server_stream import (
    FINISH_REASONS,
    cancelling,
    closing_streaming_response,
    failure,
    guarded,
    stream_events,
    until_disconnect,
)

if TYPE_CHECKING:  # fastapi is optional: imported by build_app
    from fastapi import FastAPI, Request, Response

    from .async_engine import AsyncEngine, StreamOutput

__all__ = ["ApiError", "OpenAIServer", "build_app", "parse_messages", "parse_prompt"]
logger = logging.getLogger("diffuse_engine.server")
DEFAULT_GEN_LENGTH = 128
# SamplingParams fields a request may set by name (gen_length comes from max_tokens, stop is checked here).
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("gen_length", "stop"))


def _param_of(exc: Exception) -> str | None:
    """The request field a ValueError of SamplingParams / the engine is about."""
    message = str(exc)
    word = message.split(" ", 1)[0].strip("(:,.'\"")
    if word in SAMPLING_FIELDS:
        return word
    if word in ("suffix", "infilling") or "+ suffix (" in message:  # the engine's refusals of a suffix
        return "suffix"
    return "max_tokens" if "gen_length" in message else word if word in ("prompt", "stop") else None


class OpenAIServer:
    """The state behind the routes: the engine, the served model name and request counters. ``received``:
    requests handed to the engine (less those it refused at once); ``failed``: those that ended with an error
    (used while the engine's :meth:`stats` has no ``failed``)."""

    def __init__(self, engine: "AsyncEngine", model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.llm = getattr(engine, "llm", None)  # set by AsyncEngine.from_pretrained: the folder's defaults
        self.created = int(time.time())
        self.nfe_total = self.nfe_count = 0  # over finished requests, for diffuse_nfe_per_request
        self.received = self.failed = 0
        tok = getattr(engine.engine, "tokenizer", None)
        self.roots = tuple(r for r in (getattr(tok, "source", None),) if r and not r.startswith("<"))

    @property
    def tokenizer(self) -> Any:
        return getattr(self.engine.engine, "tokenizer", None)

    def check_common(self, body: dict[str, Any], chat: bool) -> None:
        """Reject a request for another model (404), with n > 1, or asking for what this server cannot do."""
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(f"model must be a string; got {brief(model)}.", "model")
        if model is not None and model != self.model_name:
            raise ApiError(f"The model {brief(model)} does not exist; this server serves `{self.model_name}`.",
                           "model", status=404)
        if int_field(body, "n") not in (None, 1):
            raise ApiError(f"n > 1 is not supported; got n={body['n']}.", "n")
        for name in ("stream", "stream_canvas"):
            bool_field(body, name)
        diffusing_field(body)
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
            raise ApiError("logprobs are not supported.", "logprobs")
        for name, fine in (("echo", (None, False)), ("best_of", (None, 1))):
            if not chat and body.get(name) not in fine:
                raise ApiError(f"{name}={brief(body[name])} is not supported.", name)

    def sampling_params(self, body: dict[str, Any], chat: bool) -> SamplingParams:
        """SamplingParams from the request: the model folder's defaults, then what ``reasoning_effort`` /
        ``effort`` sets (:mod:`diffuse_engine.policies.effort`), then the fields the request gives."""
        overrides = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
        for name in (("max_completion_tokens",) if chat else ()) + ("max_tokens",):
            if (value := int_field(body, name)) is not None:
                overrides["gen_length"] = value
                break
        stop = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop")
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(f"stop must be a non-empty string or a list of them; got {brief(stop)}.", "stop")
        if stop:
            overrides["stop"] = stop
        effort = effort_field(body)
        try:
            if self.llm is not None:
                return self.llm.default_params(effort=effort, **overrides)
            arch = self.engine.engine.model_config.arch
            return params_with_effort(effort, arch, {"gen_length": DEFAULT_GEN_LENGTH}, overrides)
        except (ValueError, TypeError) as exc:
            raise ApiError(scrub(f"invalid sampling parameters: {str(exc)[:300]}"), _param_of(exc)) from None

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered with the model's chat template and tokenized, on a worker thread; special-
        token strings inside contents stay text (:meth:`Tokenizer.encode_chat`)."""
        tok = self.tokenizer
        if tok is None or not tok.has_chat_template:
            raise ApiError(f"the model `{self.model_name}` has no chat template; use /v1/completions.", "messages")
        try:
            return await asyncio.to_thread(tok.encode_chat, messages, True)
        except ValueError as exc:
            logger.warning("chat template of %s: %s", getattr(tok, "source", "?"), exc)
            raise ApiError(scrub(str(exc), self.roots), "messages") from None

    async def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a completions prompt (or suffix: ``param``); text is tokenized on a worker thread."""
        if not isinstance(prompt, str):
            return prompt
        tok = self.tokenizer
        if tok is None:
            raise ApiError(f"this model has no tokenizer: give the {param} as token ids.", param)
        return await asyncio.to_thread(tok.encode, prompt)

    async def start(self, prompt: str | list[int], params: SamplingParams, request_id: str, canvas: bool,
                    request: "Request", suffix: list[int] | None = None,
                    ) -> tuple[AsyncIterator["StreamOutput"], "StreamOutput"]:
        """Submit the request and wait for its first update (a refused request raises :class:`ApiError`).
        ``canvas``: an update per step (a stream's first one comes after one step, not when text is final). A
        disconnect meanwhile cancels the submission (the engine aborts what it added) and raises
        :class:`ClientGone`."""
        agen = self.engine.generate(prompt, params, request_id, output_kind="canvas" if canvas else "delta",
                                    suffix=suffix)
        self.received += 1
        try:
            return agen, await until_disconnect(request.receive, agen.__anext__())
        except BaseException as exc:
            await agen.aclose()
            if isinstance(exc, ValueError):  # refused before it was added
                self.received -= 1
                raise ApiError(scrub(str(exc)[:300], self.roots), _param_of(exc)) from None
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
        """OpenAI ``usage`` of a finished request (prompt tokens: with an infilling suffix; completion: the canvas)."""
        prompt = len(out.output.prompt_token_ids) + len(out.output.suffix_token_ids)
        completion = len(out.output.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def complete(server: OpenAIServer, request: "Request", chat: bool, limits: tuple[int, float],
                   fim: bool = False) -> "Response":
    """Answer a completions (``chat``: chat completions; ``fim``: fill-in-the-middle, a suffix required) request;
    ``limits``: the body's size and read timeout."""
    from fastapi.responses import JSONResponse, Response

    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        body = parse_json(await read_body(request, *limits))
        server.check_common(body, chat)
        messages = parse_messages(body.get("messages")) if chat else None
        raw_prompt = None if chat else parse_prompt(body.get("prompt"))
        raw_suffix = None if chat else parse_suffix(body.get("suffix"), fim)
        params = server.sampling_params(body, chat)
        stream = bool_field(body, "stream")
        # tokenizing (a template render, a long prompt) runs on a worker thread while this task listens
        prompt = await until_disconnect(request.receive, server.chat_ids(messages) if chat else
                                        server.prompt_ids(raw_prompt))
        suffix = None if raw_suffix is None else await until_disconnect(request.receive,
                                                                         server.prompt_ids(raw_suffix, "suffix"))
        agen, first = await server.start(prompt, params, rid, stream, request, suffix)
        if stream:
            events = draft_events if diffusing_field(body) else stream_events
            chunks = guarded(server, agen, events(server, agen, first, rid, chat, body, params))
            return closing_streaming_response()(chunks, agen.aclose)
        last = await until_disconnect(request.receive, server.collect(agen, first))
    except ClientGone:
        logger.info("%s: the client disconnected before the answer", rid)
        return Response(status_code=499)  # nobody reads it
    except (RuntimeError, asyncio.CancelledError) as exc:
        if cancelling():
            raise
        if isinstance(exc, RuntimeError):  # an abort counts as aborted
            server.failed += 1
            note_failure(server)
        raise failure(exc, 500, server.roots) from None
    text = {"message": {"role": "assistant", "content": last.text}} if chat else {"text": last.text}
    choice = {"index": 0, **text, "finish_reason": FINISH_REASONS.get(last.finish_reason, last.finish_reason),
              "logprobs": None}
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": server.model_name, "choices": [choice],
                         "usage": server.usage(last), "nfe": last.output.nfe})


def _add_error_handlers(app: "FastAPI", server: OpenAIServer) -> None:
    """OpenAI-style JSON bodies for refused requests, unknown routes and unexpected failures."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("%s %s failed", request.method, request.url.path)  # the server's log keeps the details
        error = ApiError(scrub(f"internal server error ({type(exc).__name__}).", server.roots), status=500,
                         kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = ApiError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code)
        return JSONResponse(error.body(), status_code=exc.status_code)


def build_app(engine: "AsyncEngine", model_name: str, *, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> "FastAPI":
    """The FastAPI app serving ``engine`` as ``model_name``. Its lifespan starts the engine's stepping thread
    and shuts the engine down. ``api_key``: every route but ``/health`` requires ``Authorization: Bearer
    <api_key>``; ``max_request_bytes`` / ``request_timeout``: a larger body is refused with 413, a body not
    received within that many seconds with 408."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be an integer >= 1; got {max_request_bytes!r}.")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds; got {request_timeout!r}.")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (None: no key).")
    key = api_key.encode("utf-8") if api_key is not None else None
    server = OpenAIServer(engine, model_name)
    limits = (max_request_bytes, request_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="diffuse-engine", lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app, server)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_api_key(request, key)  # before reading a byte of the body
        check_content_type(request)
        return await complete(server, request, False, limits)

    @app.post("/v1/fim/completions")
    async def fim_completions(request: Request) -> Response:
        check_api_key(request, key)
        check_content_type(request)
        return await complete(server, request, False, limits, fim=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_api_key(request, key)
        check_content_type(request)
        return await complete(server, request, True, limits)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_api_key(request, key)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "diffuse-engine"}]}

    @app.get("/health")
    async def health() -> Response:
        status, body = health_status(server)
        return JSONResponse(body, status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_api_key(request, key)
        text = await asyncio.to_thread(metrics_text, server)  # stats() waits for the engine lock (a step)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
