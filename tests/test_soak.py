"""A soak of the server: 500 requests at 32 concurrent over real sockets, 10% of them cancelled by their client
midway (after the first streamed chunk) and 5% poisoned (a prompt character whose embedding row is NaN, so that the
request's logits are not finite).

- Every normal request returns exactly what running it alone returns (text, finish reason, token count).
- Every poisoned request gets an OpenAI-style error; none of them disturbs the others.
- No request hangs; afterwards ``/health`` is 200, no request is left in the engine, every KV page is free, and the
  server's counters add up: finished + aborted + failed = received = sent.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from diffuse_engine import LLM  # noqa: E402
from diffuse_engine.engine import EngineConfig  # noqa: E402
from diffuse_engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from diffuse_engine.entrypoints.server import build_app  # noqa: E402

MODEL = "addition"
TOTAL, CONCURRENCY = 500, 32
POISON_CHAR = "~"  # never in a sum; its embedding row is set to NaN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(seed: int = 0) -> list[dict]:
    """The 500 requests: kind ``normal`` / ``cancel`` / ``poison`` and the request body."""
    rng = random.Random(seed)
    variants = [{}, {"temperature": 0.7}, {"policy": "threshold", "threshold": 0.9},
                {"cache": "dual", "remasking": "random", "temperature": 1.0}]
    plan = []
    for i in range(TOTAL):
        a, b = rng.randrange(10 ** 5), rng.randrange(10 ** 5)
        prompt = f"{a:05d}+{b:05d}="
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "seed": rng.randrange(1 << 30),
                **variants[i % len(variants)]}
        if i % 20 == 7:
            kind = "poison"
            body["prompt"] = prompt[:3] + POISON_CHAR + prompt[4:]
        elif i % 10 == 3:
            kind = "cancel"  # long enough to be cancelled midway
            body.update(max_tokens=48, block_length=6, steps=48, stream=True)
        else:
            kind = "normal"
        plan.append({"kind": kind, "body": body})
    return plan


async def _send(client: httpx.AsyncClient, item: dict) -> dict:
    body = item["body"]
    if item["kind"] == "cancel":
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for _chunk in resp.aiter_bytes():
                break  # the client leaves after the first chunk: the connection closes
        return {"status": resp.status_code}
    resp = await client.post("/v1/completions", json=body)
    return {"status": resp.status_code, "json": resp.json()}


@pytest.fixture(scope="module")
def served():
    llm = LLM(MODEL, device="cpu", engine_config=EngineConfig(max_num_seqs=CONCURRENCY, page_size=4,
                                                              kv_cache_tokens=16384))
    [poison] = llm.tokenizer.encode(POISON_CHAR)
    with torch.no_grad():
        llm.model.model.transformer.wte.weight[poison] = float("nan")
    engine = AsyncEngine(llm.engine)
    engine.llm = llm  # the server takes the folder's generation defaults from it
    server = uvicorn.Server(uvicorn.Config(build_app(engine, MODEL), host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield llm, engine, f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_soak_500_requests_with_cancellations_and_poison(served):
    llm, engine, url = served
    plan = _plan()

    async def main():
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        gate = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            async def one(item):
                async with gate:
                    return await _send(client, item)
            results = await asyncio.wait_for(asyncio.gather(*(one(item) for item in plan)), timeout=600)
            health = await client.get("/health")
            metrics = (await client.get("/metrics")).text
        return results, health, metrics

    results, health, metrics = asyncio.run(main())
    assert len(results) == TOTAL  # nothing hung (the gather has a deadline)

    # Every poisoned request failed with an OpenAI-style error naming the cause.
    for item, res in zip(plan, results, strict=True):
        if item["kind"] == "poison":
            assert res["status"] >= 500, res
            assert "not finite" in res["json"]["error"]["message"]
        elif item["kind"] == "cancel":
            assert res["status"] == 200
    # Every normal request equals running it alone (same model, same settings, same seed).
    normal = [(item, res) for item, res in zip(plan, results, strict=True) if item["kind"] == "normal"]
    for item, res in normal:
        assert res["status"] == 200, res
        body = item["body"]
        fields = {k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens")}
        with engine._lock:  # the engine alone, while the server's stepping thread waits
            alone = llm.generate(body["prompt"], llm.default_params(gen_length=body["max_tokens"], **fields))[0]
        choice = res["json"]["choices"][0]
        assert choice["text"] == alone.text, (body, choice)
        assert res["json"]["usage"]["completion_tokens"] == len(alone.token_ids)

    # The server is healthy and its counters add up.
    assert health.status_code == 200, health.text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    finished, aborted, failed = (values[f"diffuse_requests_{k}_total"] for k in ("finished", "aborted", "failed"))
    assert failed == sum(item["kind"] == "poison" for item in plan)
    assert finished + aborted + failed == values["diffuse_requests_received_total"] == TOTAL
    assert aborted >= 1  # the cancellations reached the engine midway
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished():
        assert time.monotonic() < deadline, "a request was left in the engine"
        time.sleep(0.05)
    kv = engine.engine.kv_cache
    assert kv is not None and kv.num_free_pages == kv.num_pages
