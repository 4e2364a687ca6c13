"""What the server reads from a request before the engine sees it: the API key, the body (a size limit and a read
timeout), the JSON object, the prompt and the chat messages. Every refusal is an :class:`ApiError`, answered with
an OpenAI-style error body; no message names a file of the server (:func:`scrub`)."""

import asyncio
import hmac
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # fastapi is optional: imported by build_app
    from fastapi import Request

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_REQUEST_TIMEOUT = 30.0
ROLES = ("system", "user", "assistant", "tool")
# An absolute path of two or more parts, not a/b/c inside a word nor the path of a URL.
_PATH = re.compile(r"(?<![\w.\-/\\:])(?:[A-Za-z]:)?(?:[/\\][^\s'\"/\\:,;()\[\]{}<>]+){2,}[/\\]?")


class ApiError(Exception):
    """An invalid request: answered with ``status``, an OpenAI-style error body and ``headers``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client went away before the answer was ready."""


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages never echo a whole (huge) field."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def scrub(message: str, roots: tuple[str, ...] = ()) -> str:
    """``message`` without filesystem paths (an exception's text may hold the model folder or a source file):
    ``roots`` and the usual prefixes become ``<path>``, then any absolute path left does too."""
    for root in sorted({*roots, str(Path.cwd()), str(Path.home()), sys.prefix, str(Path(__file__).parent)},
                       key=len, reverse=True):
        if len(root) > 1:
            message = message.replace(root, "<path>")
    return _PATH.sub("<path>", message)


def int_field(body: dict[str, Any], name: str) -> int | None:
    """``body[name]``: absent (None) or an integer >= 1 (400 naming the field otherwise)."""
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ApiError(f"{name} must be an integer >= 1; got {brief(value)}.", name)
    return value


def bool_field(body: dict[str, Any], name: str) -> bool:
    """``body[name]``: absent (False) or a boolean (400 naming the field otherwise)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(f"{name} must be a boolean; got {brief(value)}.", name)
    return bool(value)


def check_api_key(request: "Request", key: bytes | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (no check when ``key`` is None)."""
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode("latin-1", "replace")  # the header's own bytes (Starlette decodes latin-1)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, key):
        raise ApiError("Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                       status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_content_type(request: "Request") -> None:
    """415 for a body that says it is not JSON (a missing Content-Type is read as JSON)."""
    given = request.headers.get("content-type")
    media = (given or "").split(";", 1)[0].strip().lower()
    if given is not None and media != "application/json" and not (
            media.startswith("application/") and media.endswith("+json")):
        hint = (" (curl -d sends that unless given -H 'Content-Type: application/json')"
                if media == "application/x-www-form-urlencoded" else "")
        raise ApiError(f"the Content-Type header must be application/json; got {brief(given)}{hint}.", status=415)


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the request body is larger than the server's limit of {limit} bytes.", status=413,
                    headers={"Connection": "close"})


async def read_body(request: "Request", limit: int, timeout: float) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes (by Content-Length, or by counting the chunks of
    a body sent without one) and with 408 when it has not fully arrived ``timeout`` seconds after the headers;
    both close the connection. A client that disconnects meanwhile raises :class:`ClientGone`."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(f"the Content-Length header must be a byte count; got {brief(length)}.",
                           headers={"Connection": "close"})
        if int(length) > limit:
            raise _too_large(limit)

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        raise ApiError(f"the request body did not arrive within {timeout:g} s.", status=408,
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; invalid UTF-8, invalid or too deeply nested JSON, NaN / Infinity and a top
    level that is not an object are 400s."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(f"the request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError("the request body is not valid JSON: it is nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError, an integer of too many digits, NaN
        raise ApiError(f"the request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object; got {type(body).__name__}.")
    return body


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


def parse_suffix(suffix: Any, required: bool) -> str | list[int] | None:
    """The infilling suffix of a completions request (text or token ids; None or empty: none, refused when
    ``required``, as on ``/v1/fim/completions``)."""
    if suffix is None or suffix == "" or suffix == []:
        if required:
            raise ApiError("suffix is required: the text that follows the middle to fill in.", "suffix")
        return None
    if isinstance(suffix, str):
        return suffix
    if isinstance(suffix, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in suffix):
        return list(suffix)
    raise ApiError(f"suffix must be a string or a list of integer token ids; got {brief(suffix)}.", "suffix")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as ``{"role", "content"}`` dicts of strings: roles are system, user, assistant or tool;
    contents are strings or lists of text parts (joined); an assistant's content may be null."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(f"messages (required) must be a non-empty list of {{role, content}} objects; got "
                       f"{brief(messages)}.", "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(f"messages[{i}] must be an object with role and content; got {type(msg).__name__}.",
                           f"messages[{i}]")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ApiError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {brief(role)}.",
                           f"messages[{i}].role")
        content = "" if content is None and role == "assistant" else content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(f"messages[{i}].content[{j}] must be a text part {{\"type\": \"text\", \"text\": "
                                   f"...}}; other content parts are not supported.", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string or a list of text parts; got "
                           f"{type(content).__name__}.", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


EFFORT_FIELDS = ("reasoning_effort", "effort")


def effort_field(body: dict[str, Any]) -> float | None:
    """The request's effort in [0, 1] (:func:`~diffuse_engine.policies.effort.parse_effort`), from
    ``reasoning_effort`` or ``effort`` (either name; None when neither is given). An unknown value is a 400 naming
    its field; both names with different values are a 400."""
    from ..policies.effort import parse_effort

    levels = {}
    for name in EFFORT_FIELDS:
        if body.get(name) is not None:
            try:
                levels[name] = parse_effort(body[name], name)
            except ValueError as exc:
                raise ApiError(str(exc), name) from None
    if len(set(levels.values())) > 1:
        raise ApiError(f"reasoning_effort and effort name the same setting; got {brief(body['reasoning_effort'])} and "
                       f"{brief(body['effort'])}. Give one of them.", "effort")
    return next(iter(levels.values()), None)


def diffusing_field(body: dict[str, Any]) -> bool:
    """``diffusing``: absent (False) or a boolean, and only with ``stream: true`` (400 otherwise): a stream of
    whole drafts (:mod:`.server_draft`)."""
    diffusing = bool_field(body, "diffusing")
    if diffusing and not bool_field(body, "stream"):
        raise ApiError("diffusing streams the whole draft at every step: it needs stream: true.", "diffusing")
    return diffusing
