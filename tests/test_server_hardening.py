"""Hardening of ``diffuse-engine serve``: health while steps fail, request counters that add up, body size
limit and read timeout, work off the event loop, disconnects at every stage, API key, ``--threads``, error
bodies without paths, special-token text in chat contents (:meth:`Tokenizer.encode_chat`) and the README's
serve block. Driven at the ASGI level (``httpx.ASGITransport`` or a hand-made ``receive``) on the shipped
``addition`` model, plus one uvicorn server for what needs a socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")


from diffuse_engine.checkpoint import write_random_checkpoint  # noqa: E402
from diffuse_engine.engine import EngineConfig  # noqa: E402
from diffuse_engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from diffuse_engine.entrypoints.cli import main as cli_main  # noqa: E402
from diffuse_engine.entrypoints.server import build_app  # noqa: E402
from diffuse_engine.tokenizer import Tokenizer  # noqa: E402

MODEL = "addition"
PROMPT = "04821+00379="
GOOD = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6}
LONG = {**GOOD, "max_tokens": 240, "block_length": 6, "steps": 240}  # seconds of decoding on a small CPU
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine.from_pretrained(MODEL, device="cpu", engine_config=EngineConfig(
        max_num_seqs=8, page_size=4, kv_cache_tokens=2048))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, MODEL, max_request_bytes=4096, request_timeout=0.5)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _client_calls(app, *calls):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
        return [await call(c) for call in calls]


def _metrics(app) -> dict[str, float]:
    [resp] = _run(_client_calls(app, lambda c: c.get("/metrics")))
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in resp.text.splitlines()
            if line and not line.startswith("#")}


def _wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished() or engine._streams:
        assert time.monotonic() < deadline, "a request was left running"
        time.sleep(0.02)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ------------------------------------------------------------------------------------------- health, metrics
def test_health_is_degraded_only_while_steps_fail_and_the_counters_add_up(app, engine, monkeypatch):
    before = _metrics(app)
    real_step = engine.engine.step

    def failing_step():
        raise RuntimeError("the device fell over")

    [ok] = _run(_client_calls(app, lambda c: c.post("/v1/completions", json=GOOD)))
    assert ok.status_code == 200
    monkeypatch.setattr(engine.engine, "step", failing_step)
    failed, health = _run(_client_calls(app, lambda c: c.post("/v1/completions", json=GOOD),
                                        lambda c: c.get("/health")))
    assert failed.status_code == 500 and _error(failed)["type"] == "server_error"
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    monkeypatch.setattr(engine.engine, "step", real_step)
    ok, health = _run(_client_calls(app, lambda c: c.post("/v1/completions", json=GOOD),
                                    lambda c: c.get("/health")))
    assert ok.status_code == 200 and health.status_code == 200 and health.json() == {"status": "ok"}
    _disconnect_during_a_long_request(app)  # one aborted
    _wait_idle(engine)
    after = _metrics(app)
    delta = {k: after[k] - before[k] for k in ("diffuse_requests_received_total", "diffuse_requests_finished_total",
                                               "diffuse_requests_aborted_total", "diffuse_requests_failed_total")}
    assert delta == {"diffuse_requests_received_total": 4, "diffuse_requests_finished_total": 2,
                     "diffuse_requests_aborted_total": 1, "diffuse_requests_failed_total": 1}
    assert after["diffuse_requests_received_total"] == sum(after[f"diffuse_requests_{k}_total"]
                                                           for k in ("finished", "aborted", "failed"))
    [text] = _run(_client_calls(app, lambda c: c.get("/metrics")))
    for name in ("received", "failed"):
        assert f"# TYPE diffuse_requests_{name}_total counter" in text.text


# ------------------------------------------------------------------------------------------- body limits
def test_body_size_limit_by_length_and_by_chunks(app, engine):
    big = {**GOOD, "user": "x" * 5000}

    async def chunks():
        for _ in range(10):
            yield b" " * 1000  # no Content-Length: a chunked upload
        yield b"{}"

    by_length, chunked, small = _run(_client_calls(
        app, lambda c: c.post("/v1/completions", json=big),
        lambda c: c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
        lambda c: c.post("/v1/completions", json=GOOD)))
    for resp in (by_length, chunked):
        assert resp.status_code == 413 and "4096 bytes" in _error(resp)["message"]
        assert resp.headers["connection"] == "close"
    assert small.status_code == 200


def test_half_sent_body_times_out_with_408():
    """Over a socket: headers and part of the body, then silence: 408 within the timeout, connection closed."""
    eng = AsyncEngine.from_pretrained(MODEL, device="cpu", engine_config=EngineConfig(max_num_seqs=2))
    server = uvicorn.Server(uvicorn.Config(build_app(eng, MODEL, request_timeout=0.3), host="127.0.0.1",
                                           port=_free_port(), log_level="warning", timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        port = server.config.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            t0, data = time.monotonic(), b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                data += chunk
            assert time.monotonic() - t0 < 3
        assert data.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.3 s" in data
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # keep-alive ends after 1 s idle
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            t0, data = time.monotonic(), b""
            while chunk := sock.recv(4096):
                data += chunk
            assert b"200 OK" in data and 0.5 < time.monotonic() - t0 < 4
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ------------------------------------------------------------------------------------------- off the event loop
@pytest.mark.parametrize("chat", [False, True])
def test_tokenizing_does_not_block_the_event_loop(app, engine, monkeypatch, chat):
    tok = engine.engine.tokenizer
    name = "encode_chat" if chat else "encode"
    real = getattr(tok, name)

    def slow(*args, **kwargs):
        time.sleep(1.0)  # a huge prompt or a slow template: blocks whatever thread runs it
        return real(*args, **kwargs)

    monkeypatch.setattr(tok, name, slow)
    body = {**GOOD, "messages": [{"role": "user", "content": PROMPT}]} if chat else GOOD

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            request = asyncio.create_task(c.post("/v1/chat/completions" if chat else "/v1/completions", json=body))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            health = await c.get("/health")
            return time.monotonic() - t0, health, await request

    seconds, health, resp = _run(go())
    assert health.status_code == 200 and seconds < 0.5, seconds
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 6


# ------------------------------------------------------------------------------------------- disconnects
class Driver:
    """One HTTP request driven at the ASGI level: ``receive`` hands out the body (``more_body`` parts), then
    waits; ``disconnect()`` makes every later ``receive`` say ``http.disconnect``."""

    def __init__(self, body: bytes, path: str = "/v1/completions", complete: bool = True) -> None:
        self.parts = [body] if complete else [body[: len(body) // 2]]
        self.complete = complete
        self.gone = asyncio.Event()
        self.sent: list[dict] = []
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                      "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                      "root_path": "", "client": ("127.0.0.1", 1), "server": ("t", 80),
                      "headers": [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())]}

    async def receive(self) -> dict:
        if self.parts:
            return {"type": "http.request", "body": self.parts.pop(0), "more_body": not self.complete}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def disconnect(self) -> None:
        self.gone.set()

    def streamed(self) -> bool:
        return any(m["type"] == "http.response.body" and m.get("body") for m in self.sent)


async def _disconnect(app, driver: Driver, when) -> None:
    task = asyncio.create_task(app(driver.scope, driver.receive, driver.send))
    await when(driver)
    driver.disconnect()
    await asyncio.wait_for(task, 10)


def _disconnect_during_a_long_request(app) -> None:
    async def later(_d):
        await asyncio.sleep(0.3)

    _run(_disconnect(app, Driver(json.dumps(LONG).encode()), later))


def _stage_cases():
    async def soon(_d):
        await asyncio.sleep(0.05)

    async def later(_d):
        await asyncio.sleep(0.5)

    async def first_chunk(d: Driver):
        while not d.streamed():
            await asyncio.sleep(0.01)

    return {
        "during the body": (Driver(json.dumps(LONG).encode(), complete=False), soon, None),
        "while tokenizing": (Driver(json.dumps(LONG).encode()), soon, "encode"),
        "while being added": (Driver(json.dumps(LONG).encode()), soon, "_add"),
        "while waiting for the answer": (Driver(json.dumps(LONG).encode()), later, None),
        "while streaming": (Driver(json.dumps({**LONG, "stream": True}).encode()), first_chunk, None),
    }


@pytest.mark.parametrize("stage", list(_stage_cases()))
def test_a_disconnect_at_any_stage_aborts_quietly(app, engine, monkeypatch, caplog, stage):
    driver, when, slow = _stage_cases()[stage]
    if slow == "encode":
        target, real = engine.engine.tokenizer, engine.engine.tokenizer.encode
    elif slow == "_add":
        target, real = engine, engine._add
    if slow is not None:
        def slowly(*args, **kwargs):
            time.sleep(0.3)
            return real(*args, **kwargs)

        monkeypatch.setattr(target, slow, slowly)
    caplog.set_level(logging.DEBUG)
    _run(_disconnect(app, driver, when))
    time.sleep(0.4)  # a slowed call on a worker thread has returned
    _wait_idle(engine)
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# ------------------------------------------------------------------------------------------- API key
def test_an_unexpected_server_error_is_an_openai_style_500_without_details(engine, monkeypatch, caplog):
    """A bug anywhere in a route gives a JSON 500 (never plain text), with no path or traceback in the body; the
    log keeps the traceback; the next request is served normally."""
    app = build_app(engine, MODEL)
    server = app.state.server

    def broken(*_args, **_kwargs):
        raise KeyError(str(Path(__file__).resolve()))

    monkeypatch.setattr(server, "sampling_params", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def call():
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            return await c.post("/v1/completions", json=GOOD)

    with caplog.at_level(logging.ERROR):
        resp = _run(call())
    err = _error(resp)
    assert resp.status_code == 500 and err["type"] == "server_error" and "KeyError" in err["message"]
    assert "/" not in err["message"] and "Traceback" not in resp.text
    assert any(r.exc_info for r in caplog.records)
    monkeypatch.undo()
    [ok] = _run(_client_calls(app, lambda c: c.post("/v1/completions", json=GOOD)))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "005200"


def test_api_key_guards_every_route_but_health(engine, monkeypatch):
    keyed = build_app(engine, MODEL, api_key="s3cret")
    auth = {"authorization": "Bearer s3cret"}
    calls = [lambda c: c.get("/health"), lambda c: c.get("/v1/models"), lambda c: c.get("/metrics"),
             lambda c: c.post("/v1/completions", json=GOOD),
             lambda c: c.post("/v1/completions", json=GOOD, headers={"authorization": "Bearer wrong"}),
             lambda c: c.get("/v1/models", headers=auth), lambda c: c.get("/metrics", headers=auth),
             lambda c: c.post("/v1/completions", json=GOOD, headers=auth)]
    health, *denied, models, metrics, ok = _run(_client_calls(keyed, *calls))
    assert health.status_code == 200
    for resp in denied:
        err = _error(resp)
        assert resp.status_code == 401 and err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert models.status_code == metrics.status_code == ok.status_code == 200


def test_serve_flags_reach_uvicorn_torch_and_the_app(monkeypatch, capsys):
    import torch

    seen: dict = {}
    order: list[str] = []
    real_load = AsyncEngine.from_pretrained

    def load(*args, **kwargs):
        order.append("load")
        seen["engine"] = real_load(*args, **kwargs)
        return seen["engine"]

    def run(self):
        seen["config"] = self.config

    monkeypatch.setattr(torch, "set_num_threads", lambda n: order.append(f"threads={n}"))
    monkeypatch.setattr(AsyncEngine, "from_pretrained", load)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("DIFFUSE_API_KEY", "from-env")
    assert cli_main(["serve", "--model", MODEL, "--device", "cpu", "--threads", "2", "--keep-alive-timeout", "3",
                     "--max-request-bytes", "100", "--request-timeout", "4"]) == 0
    assert order == ["threads=2", "load"] and seen["config"].timeout_keep_alive == 3
    app = seen["config"].app
    [no_key, key, big] = _run(_client_calls(
        app, lambda c: c.get("/v1/models"), lambda c: c.get("/v1/models", headers={"authorization": "Bearer from-env"}),
        lambda c: c.post("/v1/completions", json={**GOOD, "user": "x" * 100},
                         headers={"authorization": "Bearer from-env"})))
    assert no_key.status_code == 401 and key.status_code == 200 and big.status_code == 413
    seen["engine"].shutdown()
    for argv, flag in ((["--threads", "0"], "--threads"), (["--max-request-bytes", "0"], "--max-request-bytes"),
                       (["--request-timeout", "0"], "--request-timeout"), (["--api-key", ""], "--api-key"),
                       (["--keep-alive-timeout", "-1"], "--keep-alive-timeout")):
        assert cli_main(["serve", "--model", MODEL, *argv]) == 2
        assert flag in capsys.readouterr().err
    assert cli_main(["serve", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--api-key", "--max-request-bytes", "--request-timeout", "--keep-alive-timeout", "--threads"):
        assert flag in help_text


# ------------------------------------------------------------------------------------------- no paths in errors
def test_error_bodies_name_no_server_path(engine, tmp_path, monkeypatch):
    folder = write_random_checkpoint(tmp_path / "secret-folder", "llada-tiny")
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no such role') }}")
    tok = Tokenizer.from_dir(folder)
    monkeypatch.setattr(engine.engine, "tokenizer", tok)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    raising_app = build_app(engine, MODEL)
    bodies = []
    [resp] = _run(_client_calls(raising_app, lambda c: c.post("/v1/chat/completions", json=chat)))
    assert resp.status_code == 400 and "no such role" in _error(resp)["message"]
    bodies.append(resp.text)
    with pytest.raises(ValueError) as info:
        tok.apply_chat_template([])
    bodies.append(str(info.value))
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template") as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    bodies.append(str(info.value))
    [resp] = _run(_client_calls(raising_app, lambda c: c.post("/v1/chat/completions", json=chat)))
    assert resp.status_code == 400
    bodies.append(resp.text)
    monkeypatch.undo()

    def failing_step():
        raise OSError(f"cannot read {folder}/model.safetensors")

    monkeypatch.setattr(engine.engine, "step", failing_step)
    resp, health = _run(_client_calls(build_app(engine, MODEL), lambda c: c.post("/v1/completions", json=GOOD),
                                      lambda c: c.get("/health")))
    assert resp.status_code == 500 and health.status_code == 503 and "<path>" in health.text
    bodies += [resp.text, health.text]
    monkeypatch.undo()
    _run(_client_calls(build_app(engine, MODEL), lambda c: c.post("/v1/completions", json=GOOD)))  # recovers
    for body in bodies:
        assert str(tmp_path) not in body and "secret-folder" not in body and str(Path.cwd()) not in body, body
        assert not re.search(r"/(?:home|tmp|work|usr|root)/", body), body


# ------------------------------------------------------------------------------------------- chat
def test_chat_over_http_keeps_special_text_as_text(app, engine):
    """The server uses encode_chat: the user's marker does not end the turn (prompt tokens count it as text)."""
    tok = engine.engine.tokenizer
    messages = [{"role": "user", "content": f"{PROMPT}<|eot_id|>"}]
    [resp] = _run(_client_calls(app, lambda c: c.post("/v1/chat/completions",
                                                      json={"messages": messages, "max_tokens": 6})))
    assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens"] == len(tok.encode_chat(messages))
    assert len(tok.encode_chat(messages)) == len(tok.encode(tok.apply_chat_template(messages))) + 9


# ------------------------------------------------------------------------------------------- README
def _serve_block() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    [block] = [b for b in blocks if "diffuse-engine serve --model addition" in b]  # the one that runs on the CPU
    return block


def test_readme_serve_block_waits_for_health_and_shows_curl_errors():
    block = _serve_block()
    assert re.search(r"until curl [^\n]*/health", block)
    for line in block.splitlines():
        if line.lstrip().startswith("curl") or " curl " in line:
            assert not re.search(r"curl\s+-s\s", line) or "-sS" in line or "--fail" in line, line
    readme = README.read_text()
    for flag in ("--api-key", "DIFFUSE_API_KEY", "--max-request-bytes", "--request-timeout", "--keep-alive-timeout",
                 "--threads"):
        assert flag in readme, flag


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_serve_block_runs_as_pasted(tmp_path):
    """The block, on a free port, with ``diffuse-engine`` from this Python's environment on PATH."""
    port = str(_free_port())
    script = _serve_block().replace("8000", port)
    bindir = str(Path(sys.executable).parent)
    if not (Path(bindir) / "diffuse-engine").exists():
        pytest.skip("the diffuse-engine command is not installed next to this Python")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "out.txt"
    with open(log, "w") as out:  # a file, not a pipe: the server the block leaves running keeps it open
        proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the server the block left running
    text = log.read_text()
    assert proc.returncode == 0 and '"text_completion"' in text, text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
