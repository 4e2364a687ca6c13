"""Infilling over HTTP: ``/v1/completions`` with a ``suffix`` (the ``openai`` client's ``suffix=``) and
``/v1/fim/completions``, plain and streamed, equal ``LLM.infill``; bad suffixes get a 400 naming the field; a
block-diffusion model refuses infilling with a 400; the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from served import serve_app

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import torch  # noqa: E402

from diffuse_engine import LLM  # noqa: E402
from diffuse_engine.engine import EngineConfig  # noqa: E402
from diffuse_engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from diffuse_engine.entrypoints.server import build_app  # noqa: E402
from diffuse_engine.models import build_model  # noqa: E402
from diffuse_engine.presets import from_name  # noqa: E402

MODEL = "text-char"
PREFIX, SUFFIX = "The function returns the ", " of the list."


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    engine = AsyncEngine.from_pretrained(MODEL, device="cpu", engine_config=EngineConfig(max_num_seqs=8))
    with serve_app(build_app(engine, MODEL)) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, device="cpu")


def _sse(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_completions_suffix_with_the_openai_client(url, llm):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    kw = {"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 16, "temperature": 0.7, "seed": 3}
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    ref = llm.infill(PREFIX, SUFFIX, params=llm.default_params(gen_length=16, temperature=0.7, seed=3))
    assert plain.choices[0].text == "".join(c.choices[0].text for c in chunks) == ref.text
    assert plain.nfe == ref.nfe and plain.usage.completion_tokens == 16 and ref.suffix_token_ids == llm.encode(SUFFIX)
    assert plain.usage.prompt_tokens == len(llm.encode(PREFIX)) + len(llm.encode(SUFFIX))  # the suffix counts
    no_suffix = client.completions.create(**{**kw, "suffix": None})
    assert no_suffix.choices[0].text == llm.generate(PREFIX, llm.default_params(gen_length=16, temperature=0.7,
                                                                                 seed=3))[0].text


def test_fim_route_plain_and_streamed(url, llm):
    body = {"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 16, "seed": 5, "steps": 8,
            "cache": "dual"}
    ref = llm.infill(PREFIX, SUFFIX, params=llm.default_params(gen_length=16, seed=5, steps=8, cache="dual"))
    with httpx.Client(base_url=url, timeout=60) as c:
        plain = c.post("/v1/fim/completions", json=body)
        assert plain.status_code == 200, plain.text
        out = plain.json()
        assert out["object"] == "text_completion" and out["choices"][0]["text"] == ref.text and out["nfe"] == 8
        with c.stream("POST", "/v1/fim/completions", json={**body, "stream": True}) as resp:
            chunks = list(_sse(resp.iter_lines()))
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == ref.text
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        ids = c.post("/v1/fim/completions", json={**body, "prompt": llm.encode(PREFIX),
                                                   "suffix": llm.encode(SUFFIX)})
        assert ids.json()["choices"][0]["text"] == ref.text


@pytest.mark.parametrize("route, change, status, param", [
    ("/v1/fim/completions", {"suffix": None}, 400, "suffix"),
    ("/v1/fim/completions", {"suffix": ""}, 400, "suffix"),
    ("/v1/completions", {"suffix": 12}, 400, "suffix"),
    ("/v1/completions", {"suffix": [1, "a"]}, 400, "suffix"),
    ("/v1/completions", {"suffix": {"text": "x"}}, 400, "suffix"),
    ("/v1/fim/completions", {"suffix": "x" * 5000}, 400, "suffix"),  # prompt + middle + suffix > model length
    ("/v1/fim/completions", {"suffix": [10 ** 7]}, 400, "suffix"),
    ("/v1/fim/completions", {"max_tokens": 0}, 400, "max_tokens"),  # an empty middle
    ("/v1/fim/completions", {"prompt": None}, 400, "prompt"),
])
def test_bad_infill_requests_get_400_naming_the_field(url, route, change, status, param):
    body = {"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 16, **change}
    with httpx.Client(base_url=url, timeout=60) as c:
        resp = c.post(route, json=body)
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and error["message"]
        ok = c.post("/v1/fim/completions", json={"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX,
                                                 "max_tokens": 16, "steps": 4})
        assert ok.status_code == 200  # the server keeps serving


def test_block_diffusion_model_refuses_infilling_with_400():
    model = build_model(from_name("sdar-tiny").config, dtype=torch.float32).init_random_(0).eval()
    engine = AsyncEngine(LLM.from_model(model).engine)
    app = build_app(engine, "sdar")
    block = model.config.block_size

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            fim = await c.post("/v1/fim/completions", json={"prompt": [1, 2, 3], "suffix": [4, 5],
                                                            "max_tokens": block, "block_length": block})
            plain = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": block,
                                                          "block_length": block, "steps": block})
            return fim, plain

    fim, plain = asyncio.run(go())
    assert fim.status_code == 400 and fim.json()["error"]["param"] == "suffix"
    assert "infilling needs full attention" in fim.json()["error"]["message"]
    assert plain.status_code == 200, plain.text
    engine.shutdown()
