"""Bad HTTP inputs to ``diffuse-engine serve``, one table: each gets a 4xx with an OpenAI-style error body whose
message or ``param`` names what is wrong; afterwards the same app still answers a normal completion with the
tokens of the engine run directly."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from diffuse_engine import LLM  # noqa: E402
from diffuse_engine.engine import EngineConfig  # noqa: E402
from diffuse_engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from diffuse_engine.entrypoints.server import build_app  # noqa: E402

MODEL = "addition"
KEY = "k3y"
LIMIT = 1 << 20  # the default
COMP, CHAT = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "04821+00379=", "max_tokens": 6}
MSGS = [{"role": "user", "content": "04821+00379="}]
DEEP = b"[" * 100_000 + b"]" * 100_000


def chat(**fields):
    return {"model": MODEL, "messages": MSGS, "max_tokens": 6, **fields}


def comp(**fields):
    return {**GOOD, **fields}


def _chunks(n: int):
    async def gen():
        for _ in range(n):
            yield b" " * 4096
        yield json.dumps(GOOD).encode()
    return gen


# (id, path, body: dict | bytes | callable giving an async iterator, headers, status, words: one must be in the
# message or equal the param). A None status means any 4xx; "keyed" ids run against the app with an API key.
CASES = [
    ("not-json", COMP, b"{not json", {}, 400, ["JSON"]),
    ("invalid-utf8", COMP, b'{"prompt": "\xff\xfe"}', {}, 400, ["UTF-8"]),
    ("empty-body", COMP, b"", {}, 400, ["JSON"]),
    ("top-level-array", COMP, b"[1, 2]", {}, 400, ["JSON object"]),
    ("top-level-string", COMP, b'"hi"', {}, 400, ["JSON object"]),
    ("top-level-null", CHAT, b"null", {}, 400, ["JSON object"]),
    ("deep-array", COMP, DEEP, {}, 400, ["nested too deeply"]),
    ("deep-in-field", COMP, b'{"prompt": ' + DEEP[:40_000] + DEEP[-40_000:] + b"}", {}, 400,
     ["nested too deeply"]),
    ("nan", COMP, b'{"prompt": "1+1=", "temperature": NaN}', {}, 400, ["NaN"]),
    ("huge-integer", COMP, b'{"prompt": "1+1=", "max_tokens": ' + b"9" * 5000 + b"}", {}, 400, ["JSON"]),
    ("body-too-large", COMP, comp(user="x" * (LIMIT + 1)), {}, 413, ["request body"]),
    ("chunked-too-large", COMP, _chunks(300), {"content-type": "application/json"}, 413, ["request body"]),
    ("text-plain", COMP, b"{}", {"content-type": "text/plain"}, 415, ["Content-Type"]),
    ("form-encoded", COMP, b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, 415,
     ["Content-Type"]),
    ("missing-prompt", COMP, {"model": MODEL}, {}, 400, ["prompt"]),
    ("empty-prompt", COMP, comp(prompt=""), {}, 400, ["prompt"]),
    ("empty-prompt-list", COMP, comp(prompt=[]), {}, 400, ["prompt"]),
    ("prompt-number", COMP, comp(prompt=5), {}, 400, ["prompt"]),
    ("two-prompts", COMP, comp(prompt=["a", "b"]), {}, 400, ["prompt"]),
    ("prompt-float-ids", COMP, comp(prompt=[1.5, 2]), {}, 400, ["prompt"]),
    ("prompt-bool-ids", COMP, comp(prompt=[True]), {}, 400, ["prompt"]),
    ("prompt-id-out-of-range", COMP, comp(prompt=[10 ** 9]), {}, 400, ["prompt", "token"]),
    ("max-tokens-string", COMP, comp(max_tokens="six"), {}, 400, ["max_tokens"]),
    ("max-tokens-zero", COMP, comp(max_tokens=0), {}, 400, ["max_tokens"]),
    ("max-tokens-negative", COMP, comp(max_tokens=-5), {}, 400, ["max_tokens"]),
    ("max-tokens-float", COMP, comp(max_tokens=6.5), {}, 400, ["max_tokens"]),
    ("max-tokens-huge", COMP, comp(max_tokens=10 ** 6), {}, 400, ["max_tokens"]),
    ("temperature-negative", COMP, comp(temperature=-1), {}, 400, ["temperature"]),
    ("temperature-string", COMP, comp(temperature="hot"), {}, 400, ["temperature"]),
    ("top-p-above-one", COMP, comp(top_p=1.5), {}, 400, ["top_p"]),
    ("top-p-list", COMP, comp(top_p=[0.5]), {}, 400, ["top_p"]),
    ("top-k-zero", COMP, comp(top_k=0), {}, 400, ["top_k"]),
    ("seed-negative", COMP, comp(seed=-1), {}, 400, ["seed"]),
    ("seed-string", COMP, comp(seed="x"), {}, 400, ["seed"]),
    ("n-two", COMP, comp(n=2), {}, 400, ["n"]),
    ("n-zero", COMP, comp(n=0), {}, 400, ["n"]),
    ("stream-string", COMP, comp(stream="yes"), {}, 400, ["stream"]),
    ("stream-canvas-number", COMP, comp(stream_canvas=1), {}, 400, ["stream_canvas"]),
    ("stop-number", COMP, comp(stop=5), {}, 400, ["stop"]),
    ("stop-empty-string", COMP, comp(stop=[""]), {}, 400, ["stop"]),
    ("stop-list-of-numbers", COMP, comp(stop=[1, 2]), {}, 400, ["stop"]),
    ("unknown-model", COMP, comp(model="nope"), {}, 404, ["model"]),
    ("model-number", COMP, comp(model=5), {}, 400, ["model"]),
    ("policy-unknown", COMP, comp(policy="bogus"), {}, 400, ["policy"]),
    ("steps-vs-block", COMP, comp(steps=5, block_length=4), {}, 400, ["steps", "block_length"]),
    ("threshold-above-one", COMP, comp(threshold=2), {}, 400, ["threshold"]),
    ("cache-unknown", COMP, comp(cache="huge"), {}, 400, ["cache"]),
    ("logprobs", COMP, comp(logprobs=3), {}, 400, ["logprobs"]),
    ("echo", COMP, comp(echo=True), {}, 400, ["echo"]),
    ("best-of", COMP, comp(best_of=3), {}, 400, ["best_of"]),
    ("chat-missing-messages", CHAT, {"model": MODEL}, {}, 400, ["messages"]),
    ("chat-empty-messages", CHAT, chat(messages=[]), {}, 400, ["messages"]),
    ("chat-messages-string", CHAT, chat(messages="hi"), {}, 400, ["messages"]),
    ("chat-message-number", CHAT, chat(messages=[5]), {}, 400, ["messages[0]"]),
    ("chat-missing-role", CHAT, chat(messages=[{"content": "hi"}]), {}, 400, ["messages[0].role"]),
    ("chat-role-admin", CHAT, chat(messages=[{"role": "admin", "content": "hi"}]), {}, 400, ["messages[0].role"]),
    ("chat-role-number-second", CHAT, chat(messages=[*MSGS, {"role": 5, "content": "x"}]), {}, 400,
     ["messages[1].role"]),
    ("chat-content-number", CHAT, chat(messages=[{"role": "user", "content": 5}]), {}, 400,
     ["messages[0].content"]),
    ("chat-content-object", CHAT, chat(messages=[{"role": "user", "content": {"text": "x"}}]), {}, 400,
     ["messages[0].content"]),
    ("chat-content-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), {}, 400, ["messages[0].content"]),
    ("chat-user-content-null", CHAT, chat(messages=[{"role": "user", "content": None}]), {}, 400,
     ["messages[0].content"]),
    ("chat-max-completion-tokens", CHAT, chat(max_completion_tokens=-3), {}, 400, ["max_completion_tokens"]),
    ("chat-temperature-bool", CHAT, chat(temperature=True), {}, 400, ["temperature"]),
    ("keyed-no-authorization", COMP, GOOD, {}, 401, ["Authorization"]),
    ("keyed-wrong-key", COMP, GOOD, {"authorization": "Bearer nope"}, 401, ["Authorization"]),
    ("keyed-basic-scheme", COMP, GOOD, {"authorization": f"Basic {KEY}"}, 401, ["Authorization"]),
    ("keyed-empty-bearer", CHAT, chat(), {"authorization": "Bearer "}, 401, ["Authorization"]),
    ("keyed-non-ascii-key", CHAT, chat(), {"authorization": "Bearer k3yé".encode()}, 401, ["Authorization"]),
]


@pytest.fixture(scope="module")
def apps():
    engine = AsyncEngine.from_pretrained(MODEL, device="cpu", engine_config=EngineConfig(
        max_num_seqs=4, page_size=4, kv_cache_tokens=1024))
    yield {"open": build_app(engine, MODEL, max_request_bytes=LIMIT),
           "keyed": build_app(engine, MODEL, max_request_bytes=LIMIT, api_key=KEY)}, engine
    engine.shutdown()


async def _post(app, path: str, body, headers: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
        if isinstance(body, dict):
            return await c.post(path, json=body, headers=headers)
        return await c.post(path, content=body() if callable(body) else body, headers=headers)


def test_the_table_has_40_distinct_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, path, body, headers, status, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_naming_the_field(apps, name, path, body, headers, status, words):
    by_kind, _ = apps
    resp = asyncio.run(_post(by_kind["keyed" if name.startswith("keyed") else "open"], path, body, headers))
    assert 400 <= resp.status_code < 500 and resp.status_code == status, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert err["type"] == "invalid_request_error", err
    assert any(w in err["message"] or w == err["param"] for w in words), err
    assert len(resp.content) < 2000  # no echo of a huge field
    if status == 401:
        assert err["code"] == "invalid_api_key"


def test_wrong_method_and_unknown_route_are_openai_errors(apps):
    by_kind, _ = apps

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=by_kind["open"]), base_url="http://t") as c:
            return await c.get(COMP), await c.post("/v1/nope", json={})

    for resp, status, word in zip(asyncio.run(go()), (405, 404), ("GET", "/v1/nope"), strict=True):
        assert resp.status_code == status and word in resp.json()["error"]["message"]


def test_the_app_still_answers_like_the_engine_run_directly(apps):
    """After every bad input above (this test runs last in the module): a normal completion and a chat equal
    ``LLM.generate`` / ``LLM.chat`` on a separate instance, token for token."""
    by_kind, engine = apps
    llm = LLM(MODEL, device="cpu", engine_config=EngineConfig(page_size=4, kv_cache_tokens=1024))
    ref = llm.generate(GOOD["prompt"], llm.default_params(gen_length=6, seed=3))[0]
    ref_chat = llm.chat(MSGS, llm.default_params(gen_length=6, seed=3))[0]
    resp = asyncio.run(_post(by_kind["open"], COMP, comp(seed=3), {}))
    resp_chat = asyncio.run(_post(by_kind["keyed"], CHAT, chat(seed=3), {"authorization": f"Bearer {KEY}"}))
    assert resp.status_code == 200 and resp_chat.status_code == 200
    out = resp.json()
    assert out["choices"][0]["text"] == ref.text == "005200"
    assert llm.encode(out["choices"][0]["text"]) == [t for t in ref.token_ids if t not in llm.tokenizer.special_ids]
    assert out["usage"] == {"prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": len(ref.token_ids),
                            "total_tokens": len(ref.prompt_token_ids) + len(ref.token_ids)}
    assert out["nfe"] == ref.nfe
    got = resp_chat.json()
    assert got["choices"][0]["message"]["content"] == ref_chat.text
    assert got["usage"]["prompt_tokens"] == len(ref_chat.prompt_token_ids)
    assert not engine.engine.has_unfinished()
