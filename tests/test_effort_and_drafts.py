"""The effort knob (``LLM.default_params(effort=...)``, ``generate --effort``, the server's ``reasoning_effort`` /
``effort``) and whole-draft streaming (``"diffusing": true``), on the shipped ``addition`` model: the mapping per
family and its bounds, explicit fields over effort, fewer forwards at low effort, drafts parsed by the ``openai``
client, revised positions reported, and the default stream unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from served import serve_app

from diffuse_engine import LLM
from diffuse_engine.engine import EngineConfig
from diffuse_engine.entrypoints.cli import main as cli_main
from diffuse_engine.policies.effort import EFFORT_FAMILIES, effort_overrides, parse_effort
from diffuse_engine.quality.tasks import get_task

MODEL = "addition"
PROMPTS = [ex.prompt for ex in get_task("addition").test_set(8)]
MASK = "░"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, device="cpu", engine_config=EngineConfig(page_size=4, kv_cache_tokens=1024))


# ------------------------------------------------------------------------------------------------ the mapping
@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
def test_effort_maps_to_the_threshold_of_every_family(arch):
    assert EFFORT_FAMILIES[arch] == "threshold"
    table = {"low": 0.9, "medium": 0.99, "high": 1.0, 0: 0.9, 0.25: 0.945, 0.5: 0.99, 0.75: 0.995, 1: 1.0}
    for effort, threshold in table.items():
        assert effort_overrides(effort, arch) == {"policy": "threshold", "threshold": threshold}
    assert "block_length" not in effort_overrides("low", arch, gen_length=64, num_blocks=4)


def test_a_named_policy_keeps_its_policy_and_gets_its_knob():
    assert effort_overrides("low", "llada", policy="fixed", gen_length=16) == {"policy": "fixed", "steps": 4}
    assert effort_overrides("medium", "dream", policy="fixed", gen_length=16) == {"policy": "fixed", "steps": 8}
    assert effort_overrides("high", "sdar", policy="fixed", gen_length=16, num_blocks=4)["steps"] == 16
    steps = effort_overrides(0.1, "llada", policy="fixed", gen_length=64, num_blocks=8)["steps"]
    assert steps % 8 == 0 and 8 <= steps <= 64  # a multiple of the blocks, at least one step each
    assert effort_overrides("high", "llada", policy="eb") == {"policy": "eb", "eb_gamma": 0.001}
    assert effort_overrides("medium", "llada", policy="factor") == {"policy": "factor", "factor": 0.5}
    low, high = (effort_overrides(e, "llada", policy="eb")["eb_gamma"] for e in (0.2, 0.8))
    assert 0.001 < high < low < 0.1


@pytest.mark.parametrize("bad", ["max", "", "extreme", -0.01, 1.01, float("nan"), float("inf"), True, None, [1]])
def test_unknown_effort_values_raise_a_sentence(bad, llm):
    with pytest.raises(ValueError, match=r"effort must be 'low', 'medium', 'high' or a number in \[0, 1\]"):
        parse_effort(bad)
    if bad is not None:
        with pytest.raises(ValueError, match="effort must be"):
            llm.default_params(effort=bad)
    with pytest.raises(ValueError, match="no rule for model family"):
        effort_overrides("low", "gpt")


def test_numbers_and_names_parse(llm):
    assert [parse_effort(v) for v in ("LOW", " medium ", "high", "0.3", 0, 1, 0.5)] == [0, 0.5, 1, 0.3, 0, 1, 0.5]


def test_explicit_fields_win_over_effort_and_effort_over_the_folder(llm):
    folder = llm.default_params()
    assert folder.policy == "fixed" and folder.steps == 6  # generation_defaults.json
    low = llm.default_params(effort="low")
    assert (low.policy, low.threshold, low.gen_length, low.remasking) == ("threshold", 0.9, 6, "low_confidence")
    assert llm.default_params(effort="high", threshold=0.5).threshold == 0.5
    fixed = llm.default_params(effort="low", policy="fixed")
    assert (fixed.policy, fixed.steps) == ("fixed", 2)
    assert llm.default_params(effort="low", policy="fixed", steps=3).steps == 3
    assert llm.default_params(effort="medium", gen_length=12, block_length=4).block_length == 4
    assert llm.default_params(effort=None) == folder


def test_low_effort_uses_fewer_forwards_than_high_at_the_same_answers(llm):
    outs = {e: llm.generate(PROMPTS, llm.default_params(effort=e)) for e in ("low", "medium", "high")}
    nfe = {e: sum(o.nfe for o in out) for e, out in outs.items()}
    assert nfe["low"] <= nfe["medium"] < nfe["high"] and nfe["low"] < nfe["high"], nfe
    assert [o.text for o in outs["low"]] == [o.text for o in outs["high"]]


def test_cli_generate_effort(capsys):
    args = ["generate", "--model", MODEL, "--prompt", PROMPTS[0], "--json"]
    runs = {}
    for effort in ("low", "high"):
        assert cli_main([*args, "--effort", effort]) == 0
        runs[effort] = json.loads(capsys.readouterr().out)
    assert runs["low"]["params"]["threshold"] == 0.9 and runs["high"]["params"]["threshold"] == 1.0
    assert runs["low"]["nfe"] < runs["high"]["nfe"] and runs["low"]["text"] == runs["high"]["text"]
    assert cli_main([*args, "--effort", "high", "--policy", "fixed"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 6
    for bad in ("extreme", "1.5"):
        assert cli_main([*args, "--effort", bad]) == 2
        assert "effort must be 'low', 'medium', 'high'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the server
fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from diffuse_engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from diffuse_engine.entrypoints.server import build_app  # noqa: E402


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[openai.OpenAI, object]]:
    engine = AsyncEngine.from_pretrained(MODEL, device="cpu", engine_config=EngineConfig(
        max_num_seqs=4, page_size=4, kv_cache_tokens=1024))
    app = build_app(engine, MODEL)
    with serve_app(app) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30), app


def _post(app, path: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            return await c.post(path, json=body)
    return asyncio.run(go())


def test_server_effort_fields(served, llm):
    client, _ = served
    ref = {e: llm.generate(PROMPTS[1], llm.default_params(effort=e))[0] for e in ("low", "high")}
    low = client.completions.create(model=MODEL, prompt=PROMPTS[1], extra_body={"effort": "low"})
    high = client.completions.create(model=MODEL, prompt=PROMPTS[1], extra_body={"reasoning_effort": "high"})
    assert (low.nfe, high.nfe) == (ref["low"].nfe, ref["high"].nfe) and low.nfe < high.nfe
    assert low.choices[0].text == high.choices[0].text == ref["low"].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}],
                                          reasoning_effort="low", max_tokens=6)
    both = client.completions.create(model=MODEL, prompt=PROMPTS[1], extra_body={"effort": 0.0,
                                                                                  "reasoning_effort": "low"})
    explicit = client.completions.create(model=MODEL, prompt=PROMPTS[1],
                                         extra_body={"effort": "low", "policy": "fixed", "steps": 6})
    assert chat.nfe <= 2 and both.nfe == low.nfe and explicit.nfe == 6


def test_server_bad_effort_and_diffusing_are_400(served):
    _, app = served
    comp = {"model": MODEL, "prompt": PROMPTS[0]}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}]}
    cases = [("/v1/completions", {**comp, "effort": "extreme"}, "effort"),
             ("/v1/chat/completions", {**chat, "reasoning_effort": 2}, "reasoning_effort"),
             ("/v1/completions", {**comp, "reasoning_effort": "x" * 10_000}, "reasoning_effort"),
             ("/v1/completions", {**comp, "effort": "low", "reasoning_effort": "high"}, "effort"),
             ("/v1/completions", {**comp, "diffusing": True}, "diffusing"),
             ("/v1/chat/completions", {**chat, "diffusing": True, "stream": False}, "diffusing"),
             ("/v1/completions", {**comp, "diffusing": "yes", "stream": True}, "diffusing")]
    for path, body, param in cases:
        resp = _post(app, path, body)
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == param and len(resp.content) < 2000, (body, err)
        assert param in err["message"]


def test_diffusing_stream_of_completions_and_chat(served, llm):
    client, _ = served
    ref = llm.generate(PROMPTS[2], llm.default_params(seed=0))[0]
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[2], seed=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], seed=0, stream=True,
                                            extra_body={"diffusing": True}))
    assert len(chunks) == ref.nfe == 6
    masked = 7
    for chunk in chunks:
        draft, text = chunk.draft, chunk.choices[0].text
        assert draft["replace"] is True and len(draft["tokens"]) == len(draft["committed"]) == 6
        assert draft["revised"] == [] and draft["committed"].count(False) < masked
        masked = draft["committed"].count(False)
        if chunk is not chunks[-1]:
            assert chunk.choices[0].finish_reason is None and text.count(MASK) == masked and len(text) == 6
    final = chunks[-1]
    assert final.choices[0].text == plain.choices[0].text == ref.text and final.draft["tokens"] == ref.token_ids
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason and final.nfe == ref.nfe
    messages = [{"role": "user", "content": PROMPTS[2]}]
    chat = list(client.chat.completions.create(model=MODEL, messages=messages, seed=0, max_tokens=6, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"diffusing": True}))
    first, steps, usage = chat[0], chat[1:-1], chat[-1]
    assert first.choices[0].delta.role == "assistant" and usage.usage.completion_tokens == 6
    assert [c.choices[0].delta.content.count(MASK) for c in steps] == [5, 4, 3, 2, 1, 0]
    assert steps[-1].choices[0].delta.content == llm.chat(messages, llm.default_params(seed=0))[0].text
    assert steps[-1].choices[0].finish_reason is not None


def test_diffusing_reports_the_revised_positions(served):
    client, _ = served
    extra = {"revision": "remdm", "remdm_eta": 1.0, "remdm_variant": "rescale", "stream_canvas": True,
             "diffusing": True}
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], seed=0, stream=True, extra_body=extra))
    revised = [c.draft["revised"] for c in chunks]
    assert any(revised)
    for chunk, positions in zip(chunks, revised, strict=True):
        assert positions == sorted({p for p, _, _ in chunk.canvas["revised"]})
        assert all(0 <= p < 6 for p in positions)
    assert chunks[-1].draft["committed"] == [True] * 6


def test_the_default_stream_is_unchanged(served, llm):
    client, _ = served
    ref = llm.generate(PROMPTS[3], llm.default_params(seed=0))[0]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], seed=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert all("draft" not in (c.model_extra or {}) for c in chunks) and MASK not in "".join(
        c.choices[0].text for c in chunks)
