"""``diffuse-engine serve``: the OpenAI-compatible HTTP server, driven over loopback with the ``openai`` client
and ``httpx`` on the shipped ``addition`` model: completions and chat (plain and streamed) equal ``LLM.generate``,
extra sampling fields, canvas streaming, 32 concurrent requests, cancellation, bad requests and a bounded soak."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from served import free_port, serve_app

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from diffuse_engine import LLM  # noqa: E402
from diffuse_engine.engine import EngineConfig  # noqa: E402
from diffuse_engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from diffuse_engine.entrypoints.cli import main as cli_main  # noqa: E402
from diffuse_engine.entrypoints.server import build_app  # noqa: E402
from diffuse_engine.quality.tasks import get_task  # noqa: E402

PROMPTS = [ex.prompt for ex in get_task("addition").test_set(40)]
MODEL = "addition"


@dataclass
class Served:
    """The module's server: its port and engine, an ``openai`` client, and /metrics as numbers."""

    port: int
    engine: AsyncEngine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=30)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and every KV page is free."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["diffuse_requests_running"] == m["diffuse_requests_waiting"] == 0
                    and m["diffuse_kv_pages_free"] == m["diffuse_kv_pages_total"]):
                return m
            assert time.monotonic() < deadline, f"the server did not become idle: {m}"
            time.sleep(0.02)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def served(request) -> Iterator[Served]:
    """The server on one process, then sharded over two (tensor parallelism, gloo): every test runs on both."""
    engine = AsyncEngine.from_pretrained(MODEL, device="cpu", engine_config=EngineConfig(
        max_num_seqs=16, page_size=4, kv_cache_tokens=2048, tensor_parallel_size=request.param))
    try:
        with serve_app(build_app(engine, MODEL)) as port:
            yield Served(port, engine)
    finally:
        engine.llm.close()


@pytest.fixture(scope="module")
def llm() -> LLM:
    """A separate model instance: the reference outputs of requests run alone."""
    return LLM(MODEL, device="cpu", engine_config=EngineConfig(page_size=4, kv_cache_tokens=2048))


def _finish(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}[reason]


def _sse(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_metrics_and_health(served):
    """First in the file: the one finished request sets the mean NFE per request."""
    served.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, extra_body={"cache": "prefix"})
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    m = served.wait_idle()
    for name in ("requests_waiting", "requests_running", "requests_finished_total", "requests_aborted_total",
                 "output_tokens_total", "output_tokens_per_second", "steps_total", "step_seconds_last",
                 "nfe_per_request", "kv_pages_free", "kv_pages_total"):
        assert f"# TYPE diffuse_{name} " in text and f"diffuse_{name}" in m
    assert m["diffuse_nfe_per_request"] == 6 and m["diffuse_steps_total"] > 0 and m["diffuse_kv_pages_total"] > 0
    estimate = getattr(served.engine.engine, "last_estimate", None)
    if getattr(estimate, "regime", None) in ("memory", "compute"):  # only an engine with a cost model has one
        assert m[f'diffuse_step_regime{{regime="{estimate.regime}"}}'] == 1
    else:
        assert "diffuse_step_regime" not in text
    assert httpx.get(f"{served.url}/health", timeout=10).json() == {"status": "ok"}


def test_completions_equal_llm_generate(served, llm):
    client = served.client()
    kw = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0.8, "seed": 7}
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    ref = llm.generate(PROMPTS[0], llm.default_params(gen_length=6, temperature=0.8, seed=7))[0]
    assert plain.object == "text_completion" and plain.model == MODEL and plain.id.startswith("cmpl-")
    assert plain.choices[0].text == "".join(c.choices[0].text for c in chunks) == ref.text
    assert plain.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == _finish(ref.finish_reason)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert plain.usage.prompt_tokens == len(ref.prompt_token_ids) and plain.usage.completion_tokens == 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 6 and plain.nfe == ref.nfe
    greedy = client.completions.create(model=MODEL, prompt="04821+00379=", max_tokens=6)
    assert greedy.choices[0].text == "005200"  # the trained model adds
    by_ids = client.completions.create(model=MODEL, prompt=llm.encode("04821+00379="), max_tokens=6)
    assert by_ids.choices[0].text == "005200"
    default = client.completions.create(model=MODEL, prompt=[PROMPTS[1]])  # the folder's gen_length (6)
    assert default.usage.completion_tokens == 6 and default.choices[0].text == llm.generate(PROMPTS[1])[0].text


def test_chat_completions(served, llm):
    client = served.client()
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": PROMPTS[2]}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=1)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=1, stream=True,
                                                 stream_options={"include_usage": True}))
    ref = llm.chat(messages, llm.default_params(gen_length=6, seed=1))[0]
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == ref.text
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    final, usage = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert usage.choices == [] and usage.usage.total_tokens == plain.usage.total_tokens


def test_chat_without_a_template_and_text_without_a_tokenizer_are_400(llm):
    bare = AsyncEngine(LLM.from_model(llm.model, None).engine)  # no tokenizer: no chat template, no text prompts
    app = build_app(bare, "bare")

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            chat = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            text = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6})
            health = await c.get("/health")  # the lifespan never ran: no stepping thread
            return chat, text, health

    chat, text, health = asyncio.run(go())
    assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
    assert text.status_code == 400 and "tokenizer" in text.json()["error"]["message"]
    assert health.status_code == 503
    bare.shutdown()


def test_extra_body_fields_and_canvas_stream(served, llm):
    client = served.client()
    extra = {"steps": 3, "block_length": 2, "policy": "threshold", "threshold": 0.5, "cache": "dual"}
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, seed=0, extra_body=extra)
    ref = llm.generate(PROMPTS[3], llm.default_params(gen_length=6, seed=0, **extra))[0]
    assert plain.choices[0].text == ref.text and plain.nfe == ref.nfe
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, seed=0, stream=True,
                                            extra_body={**extra, "stream_canvas": True}))
    canvases = [c.canvas for c in chunks]
    assert len(canvases) == ref.nfe and "".join(c.choices[0].text for c in chunks) == ref.text
    masked = 6
    for cv in canvases:
        assert set(cv) >= {"step", "block", "tokens", "masked", "confidences", "revised"} and len(cv["tokens"]) == 6
        assert len(cv["masked"]) < masked and all(cv["confidences"][i] == 0 for i in cv["masked"])
        masked = len(cv["masked"])
    assert canvases[-1]["masked"] == [] and canvases[-1]["tokens"] == ref.token_ids


def test_32_concurrent_requests_equal_running_alone(served, llm):
    client = served.client()
    params = llm.default_params(gen_length=6, seed=0)
    alone = [llm.generate(p, params)[0].text for p in PROMPTS[:32]]

    def one(i: int) -> str:
        kw = {"model": MODEL, "prompt": PROMPTS[i], "max_tokens": 6, "seed": 0}
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    assert got == alone
    served.wait_idle()


def test_cancel_mid_stream_frees_slot_and_pages(served):
    before = served.metrics()["diffuse_requests_aborted_total"]
    body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 240, "block_length": 6, "steps": 240, "seed": 0,
            "cache": "dual", "stream": True, "stream_canvas": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{served.url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        first = next(_sse(resp.iter_lines()))
        assert first["canvas"]["step"] == 0
    m = served.wait_idle()
    assert m["diffuse_kv_pages_total"] > 0 and m["diffuse_requests_aborted_total"] == before + 1


def test_disconnect_during_a_non_streamed_request_aborts_it(served):
    before = served.metrics()["diffuse_requests_aborted_total"]
    body = {"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 240, "block_length": 6, "steps": 240, "seed": 0}
    # ~3 s of decoding alone on a 2-core CPU: it cannot finish within the client's 0.3 s
    with httpx.Client(timeout=httpx.Timeout(30, read=0.3)) as c, pytest.raises(httpx.ReadTimeout):
        c.post(f"{served.url}/v1/completions", json=body)  # the client gives up and closes the connection
    m = served.wait_idle()
    assert m["diffuse_requests_aborted_total"] == before + 1


def test_stop_strings_stream_the_final_text(served, llm):
    """The engine may commit the start of a stop string before it sees the whole string: the stream holds such
    text back, so the joined deltas equal the final text cut before the stop string."""
    client = served.client()
    for prompt in ("96759+00633=", *PROMPTS[6:9]):
        full = llm.generate(prompt, llm.default_params(gen_length=6, seed=0))[0].text
        for stop in (full[0:2], full[2:4], [full[3:5], "zz"]):
            kw = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "seed": 0, "stop": stop}
            plain = client.completions.create(**kw)
            chunks = list(client.completions.create(**kw, stream=True))
            ref = llm.generate(prompt, llm.default_params(gen_length=6, seed=0, stop=stop))[0]
            assert plain.choices[0].text == "".join(c.choices[0].text for c in chunks) == ref.text, (prompt, stop)
            assert plain.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == _finish(ref.finish_reason)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    url = served.url
    comp, chat = "/v1/completions", "/v1/chat/completions"
    good = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6}
    bad = [
        (comp, b"{not json"), (comp, b"[1, 2]"), (comp, b"\xff\xfe"), (comp, b""),
        (comp, {"model": MODEL}), (comp, {**good, "prompt": ""}), (comp, {**good, "prompt": []}),
        (comp, {**good, "prompt": 5}), (comp, {**good, "prompt": ["a", "b"]}), (comp, {**good, "prompt": [10 ** 9]}),
        (comp, {**good, "max_tokens": "six"}), (comp, {**good, "max_tokens": 0}), (comp, {**good, "max_tokens": 10**6}),
        (comp, {**good, "temperature": -1}), (comp, {**good, "temperature": "hot"}), (comp, {**good, "top_p": 1.5}),
        (comp, {**good, "top_k": 0}), (comp, {**good, "seed": -1}), (comp, {**good, "n": 2}),
        (comp, {**good, "stream": "yes"}), (comp, {**good, "stop": 5}), (comp, {**good, "model": "nope"}),
        (comp, {**good, "policy": "bogus"}), (comp, {**good, "steps": 5, "block_length": 4}),
        (comp, {**good, "threshold": 2}), (comp, {**good, "cache": "huge"}), (comp, {**good, "remasking": "x"}),
        (comp, {**good, "revision": "nope"}), (comp, {**good, "logprobs": 3}), (comp, {**good, "echo": True}),
        (chat, {"model": MODEL}), (chat, {"messages": []}), (chat, {"messages": "hi"}),
        (chat, {"messages": [{"content": "hi"}]}), (chat, {"messages": [{"role": "user", "content": 5}]}),
        (chat, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}),
    ]
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body in bad:
            resp = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
            assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
            err = resp.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error" and err["code"] is None, body
        assert c.post(comp, json={**good, "model": "nope"}).status_code == 404
        assert c.post(comp, json={**good, "policy": "bogus"}).json()["error"]["param"] == "policy"
        assert c.get("/v1/nope").status_code == 404 and c.get(comp).status_code == 405
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert c.post(comp, json={**good, "unknown_field": [1], "user": "u", "max_tokens": 6}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        served.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, n=2)
    assert served.client().completions.create(**good).choices[0].text
    served.wait_idle()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for the RSS")
def test_soak_500_requests_with_cancellations(served, llm):
    """500 requests, 16 at a time, every 10th cancelled after its first chunk: all others finish with the text of
    running alone, within a time bound; RSS grows by less than 200 MB; every page is free at the end."""
    caches = ("none", "dual")
    refs = {(p, c): o.text for c in caches for p, o in zip(PROMPTS, llm.generate(
        PROMPTS, llm.default_params(gen_length=6, seed=0, cache=c)), strict=True)}
    before = served.metrics()
    rss0 = _rss_mb()

    async def one(c: httpx.AsyncClient, i: int) -> str | None:
        prompt, cache = PROMPTS[i % len(PROMPTS)], caches[i % 2]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "seed": 0, "cache": cache}
        if i % 10 == 3:  # cancelled mid-stream
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True, "stream_canvas": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return None
        if i % 3 == 0:
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                text = "".join([ch["choices"][0]["text"] async for ch in _asse(r.aiter_lines())])
        else:
            text = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        assert text == refs[(prompt, cache)], (i, text)
        return text

    async def main() -> list[str | None]:
        sem = asyncio.Semaphore(16)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=served.url, timeout=30, limits=limits) as c:
            async def bounded(i: int) -> str | None:
                async with sem:
                    return await one(c, i)
            return await asyncio.gather(*(bounded(i) for i in range(500)))

    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), timeout=90))
    seconds = time.monotonic() - start
    after = served.wait_idle()
    assert not served.engine._streams and not served.engine.engine.has_unfinished()  # nothing left behind
    growth = _rss_mb() - rss0
    assert sum(r is None for r in results) == 50 and all(r for r in results if r is not None)
    finished = after["diffuse_requests_finished_total"] - before["diffuse_requests_finished_total"]
    aborted = after["diffuse_requests_aborted_total"] - before["diffuse_requests_aborted_total"]
    assert finished >= 450 and finished + aborted == 500, (finished, aborted)
    assert seconds < 90 and growth < 200, (seconds, growth)
    assert served.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6).choices[0].text
    print(f"soak: 500 requests in {seconds:.1f} s, {aborted:.0f} aborted, RSS growth {growth:.1f} MB")


async def _asse(lines):
    async for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_serve_command_checks_its_arguments_and_imports_fastapi_lazily(capsys):
    assert cli_main(["serve", "--model", MODEL, "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    code = ("import sys, diffuse_engine.entrypoints.cli, diffuse_engine.entrypoints.server; "
            "assert 'fastapi' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_serve_command_serves_until_interrupted():
    port = free_port()
    cmd = [sys.executable, "-m", "diffuse_engine.entrypoints.cli", "serve", "--model", MODEL, "--port", str(port),
           "--device", "cpu", "--max-num-seqs", "4", "--kv-cache-tokens", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                         json={"model": MODEL, "prompt": "04821+00379=", "max_tokens": 6}).json()
        assert out["choices"][0]["text"] == "005200"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
