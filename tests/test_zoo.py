"""The trained models shipped in the package load through the normal loader, by folder or by name, and reach
their targets (minus a small margin for the smaller evaluation subset used here) on held-out test data."""

from __future__ import annotations

import json

import pytest

from diffuse_engine import LLM
from diffuse_engine.errors import CheckpointError
from diffuse_engine.loader import load_model
from diffuse_engine.quality.evaluate import elbo_bits, evaluate_task
from diffuse_engine.quality.tasks import get_task
from diffuse_engine.quality.zoo import ZOO_DIR, shipped_models
from diffuse_engine.sampling_params import read_generation_defaults

REQUIRED = ("addition", "sudoku4x4", "text-char")


def test_the_shipped_models_are_there_and_small():
    models = shipped_models()
    assert set(REQUIRED) <= set(models)
    total = sum(f.stat().st_size for f in ZOO_DIR.rglob("*") if f.is_file())
    assert total < 20 * 2**20
    for name, folder in models.items():
        card = (folder / "README.md").read_text()
        assert "## How it was trained" in card and "## Results" in card, name
        summary = json.loads((folder / "training.json").read_text())
        assert summary["config"]["task"] == name and summary["wall_s"] > 0 and summary["metrics"]
        assert read_generation_defaults(folder)["gen_length"] > 0


@pytest.fixture(scope="module")
def llms():
    return {name: LLM(name, device="cpu") for name in REQUIRED}


def test_load_by_name_equals_load_by_folder(llms):
    model, config, tok = load_model(shipped_models()["addition"])
    assert config.arch == "llada" and tok is not None
    by_name = llms["addition"].model.state_dict()
    for key, value in model.state_dict().items():
        assert by_name[key].equal(value), key
    with pytest.raises(CheckpointError, match="shipped models: .*addition"):
        load_model("no-such-model")


def test_addition_reaches_its_target(llms):
    res = evaluate_task(llms["addition"], get_task("addition"), "low_confidence", limit=300)
    assert res.nfe == 6 and res.accuracy >= 0.95, res.failures  # target 97% on the full test set


def test_sudoku_reaches_its_target(llms):
    res = evaluate_task(llms["sudoku4x4"], get_task("sudoku4x4"), "low_confidence", limit=300)
    assert res.nfe == 16 and res.accuracy >= 0.88, res.failures  # target 90% on the full test set


def test_text_model_bits_per_char_matches_its_card(llms):
    llm = llms["text-char"]
    card = json.loads((shipped_models()["text-char"] / "training.json").read_text())["metrics"]
    corpus = get_task("text-char")
    r = elbo_bits(llm.model, llm.tokenizer, corpus.held_out_text(), samples=4, max_windows=40)
    assert r["bits_per_char"] < card["held_out_bits_per_char"] + 0.25
    assert r["bits_per_char"] < 3.5  # far below the 8.3 bits of a uniform byte model


def test_generation_defaults_apply(llms):
    llm = llms["addition"]
    out = llm.generate("12345+54321=")[0]
    assert len(out.token_ids) == 6 and out.nfe == 6 and out.text.isdigit() and len(out.text) == 6
    p = llm.default_params(gen_length=12)
    assert (p.gen_length, p.block_length, p.steps) == (12, 12, 12)  # the folder's block/steps were for 6
    p = llm.default_params(steps=3)
    assert (p.gen_length, p.block_length, p.steps) == (6, 6, 3)
