"""Training (LLaDA's masked-diffusion objective), the evaluation harness and the sweep, end to end on tiny
settings."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from diffuse_engine import presets
from diffuse_engine.entrypoints.cli import main
from diffuse_engine.entrypoints.llm import LLM
from diffuse_engine.loader import load_model
from diffuse_engine.models import build_model
from diffuse_engine.quality.evaluate import KNOBS, POLICIES, elbo_bits, evaluate_task
from diffuse_engine.quality.sweep import default_steps, run_sweep
from diffuse_engine.quality.tasks import Addition, Example, Sorting, TextCorpus
from diffuse_engine.quality.train import Batch, TrainConfig, diffusion_loss, sample_mask, task_batch, train
from diffuse_engine.sampling_params import REMASKING, SamplingParams
from diffuse_engine.tokenizer import Tokenizer, build_byte_tokenizer

PRESET = presets.from_name("llada-tiny")
EOS, MASK = PRESET.config.eos_token_id, PRESET.config.mask_token_id


def _tokenizer() -> Tokenizer:
    return Tokenizer(build_byte_tokenizer(PRESET.config.vocab_size, PRESET.special_tokens))


def _tiny(tmp_path: Path, task: str = "sorting", **kw) -> TrainConfig:
    fields = dict(task=task, out=str(tmp_path / task), steps=3, batch_size=16, hidden_size=32, num_layers=1,
                  num_heads=2, intermediate_size=64, eval_every=2, eval_limit=4, test_limit=4, threads=1,
                  seq_len=32, warmup=1)
    fields.update(kw)
    return TrainConfig(**fields)


def test_task_batch_layout():
    tok = _tokenizer()
    task = Sorting()
    batch = task_batch(task, [Example("3,1=", "1,3"), Example("10,2,7=", "2,7,10")], tok, EOS)
    g = task.gen_length
    assert batch.ids.shape == (2, 7 + g) and batch.norm == 2 * g
    row0 = batch.ids[0].tolist()
    assert row0[:4] == tok.encode("3,1=") and row0[4:7] == tok.encode("1,3") and row0[7:4 + g] == [EOS] * (g - 3)
    assert batch.trainable[0].tolist() == [False] * 4 + [True] * g + [False] * 3  # prompt never trained
    assert batch.attended[0].tolist() == [True] * (4 + g) + [False] * 3  # right padding is not attended
    assert batch.trainable[1].tolist() == [False] * 7 + [True] * g and bool(batch.attended[1].all())
    with pytest.raises(ValueError, match="longer than the canvas"):
        task_batch(task, [Example("1=", "1" * (g + 1))], tok, EOS)


def test_mask_sampling_respects_the_prompt_and_the_rate():
    ids = torch.zeros(4000, 40, dtype=torch.long)
    trainable = torch.zeros_like(ids, dtype=torch.bool)
    trainable[:, 10:] = True
    masked, p = sample_mask(Batch(ids, trainable, None, 1.0), 1e-3, torch.Generator().manual_seed(0))
    assert not masked[:, :10].any()
    assert float(p.min()) >= 1e-3 and float(p.max()) <= 1.0
    # per row the masked count is Binomial(30, p): its mean over rows matches 30 * p within 4 standard errors
    counts = masked.sum(1).double()
    expected = 30 * p.double()
    se = math.sqrt(float((30 * p * (1 - p)).sum())) / len(p)
    assert abs(float(counts.mean() - expected.mean())) < 4 * se


def test_diffusion_loss_matches_a_plain_computation():
    torch.manual_seed(0)
    cfg = PRESET.config.replace(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    model = build_model(cfg).init_random_(1)
    batch = task_batch(Sorting(), [Example("3,1=", "1,3"), Example("10,2,7=", "2,7,10")], _tokenizer(), EOS)
    loss = diffusion_loss(model, batch, MASK, 0.1, torch.Generator().manual_seed(5))
    masked, p = sample_mask(batch, 0.1, torch.Generator().manual_seed(5))
    total = 0.0
    for i in range(2):
        noisy = batch.ids[i].clone()
        noisy[masked[i]] = MASK
        n = int(batch.attended[i].sum()) if batch.attended is not None else noisy.numel()
        logp = torch.log_softmax(model(noisy[None, :n]).double()[0], -1)
        for j in masked[i].nonzero().flatten().tolist():
            total += -float(logp[j, batch.ids[i, j]]) / float(p[i])
    assert masked.any()
    assert float(loss) == pytest.approx(total / batch.norm, rel=1e-4)


def test_train_writes_a_loadable_checkpoint_deterministically(tmp_path):
    r1 = train(_tiny(tmp_path / "a"), progress=False)
    r2 = train(_tiny(tmp_path / "b"), progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training.json", "train_log.csv"):
        assert (r1.folder / name).is_file(), name
    m1, cfg, tok = load_model(r1.folder)
    m2, _, _ = load_model(r2.folder)
    assert tok is not None and cfg.hidden_size == 32 and cfg.mask_token_id == MASK
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    summary = json.loads((r1.folder / "training.json").read_text())
    assert summary["config"]["steps"] == 3 and summary["examples_seen"] == 48
    assert set(summary["metrics"]) >= {"test_accuracy[low_confidence, 1 token/step]", "test_examples"}
    card = (r1.folder / "README.md").read_text()
    assert "## How it was trained" in card and "Wall time" in card and "seed 0" in card
    rows = list(csv.DictReader(open(r1.folder / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and rows[1]["val_metric"] == "accuracy"
    r3 = train(_tiny(tmp_path / "c", seed=1), progress=False)
    m3, _, _ = load_model(r3.folder)
    wte = "model.transformer.wte.weight"
    assert not torch.equal(m1.state_dict()[wte], m3.state_dict()[wte])


def test_training_reduces_the_loss_on_text(tmp_path):
    r = train(_tiny(tmp_path, "text-char", steps=40, lr=3e-3, batch_size=8, eval_every=40, test_limit=2),
              progress=False)
    rows = list(csv.DictReader(open(r.folder / "train_log.csv")))
    first = sum(float(x["loss"]) for x in rows[:5]) / 5
    last = sum(float(x["loss"]) for x in rows[-5:]) / 5
    assert last < 0.8 * first
    assert r.metrics["held_out_bits_per_char"] < math.log2(320) and len(r.metrics["samples"]) == 3


def test_train_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        train(_tiny(tmp_path, task="nope"), progress=False)
    with pytest.raises(ValueError, match="hidden_size .* multiple of num_heads"):
        train(_tiny(tmp_path, num_heads=3), progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train(_tiny(tmp_path, steps=0), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        train(_tiny(tmp_path, out=str(tmp_path / "full")), progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_elbo_of_a_uniform_model_is_log2_vocab():
    """All-zero LM head -> uniform predictions: every masked token costs ln(V) and the estimator weights
    l masked tokens by L/l, so the bound is exactly L ln V per window whatever the draws."""
    model = build_model(PRESET.config).init_random_(0)
    model.lm_head_weight().zero_()
    r = elbo_bits(model, _tokenizer(), "hello world, " * 40, seq_len=16, samples=3)
    assert r["bits_per_byte"] == pytest.approx(math.log2(PRESET.config.vocab_size), rel=1e-6)
    assert r["bits_per_char"] == pytest.approx(r["bits_per_byte"])
    with pytest.raises(ValueError, match="shorter than one window"):
        elbo_bits(model, _tokenizer(), "short", seq_len=16)


def test_evaluate_task_counts_what_the_checker_accepts(tmp_path):
    folder = train(_tiny(tmp_path, task="addition", steps=1, test_limit=2), progress=False).folder
    llm = LLM(folder, device="cpu")
    task = Addition()
    data = task.test_set(6)
    res = evaluate_task(llm, task, "low_confidence", examples=data)
    outs = llm.generate([e.prompt for e in data], SamplingParams_for(task))
    expected = sum(task.check(e.prompt, o.text) for e, o in zip(data, outs, strict=True))
    assert res.correct == expected and res.n == 6 and res.accuracy == expected / 6
    assert res.nfe == task.gen_length and res.tokens_per_forward == 1.0
    half = evaluate_task(llm, task, "random", steps=task.gen_length // 2, examples=data)
    assert half.nfe == task.gen_length // 2 and half.tokens_per_forward == 2.0
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate_task(llm, task, "nope", examples=data)
    with pytest.raises(ValueError, match="text corpus"):
        evaluate_task(llm, TextCorpus())


def SamplingParams_for(task):  # noqa: N802 - mirrors the class it builds
    from diffuse_engine import SamplingParams

    return SamplingParams(gen_length=task.gen_length, block_length=task.block_length, steps=task.gen_length,
                          temperature=0.0, remasking="low_confidence", seed=0)


def test_policies_cover_every_ordering_and_default_steps():
    from diffuse_engine.sampling_params import POLICIES as DECODING
    from diffuse_engine.sampling_params import REVISIONS

    assert set(REMASKING) <= set(POLICIES) and set(KNOBS) <= set(POLICIES)
    # every decoding and revision policy the engine has is in the sweep, and every entry is valid
    assert {POLICIES[p].get("policy", "fixed") for p in POLICIES} == set(DECODING)
    assert {POLICIES[p].get("revision") for p in POLICIES} - {None} == set(REVISIONS)
    for fields in POLICIES.values():
        SamplingParams(gen_length=8, **fields)
    assert default_steps(8, 8) == [8, 4, 2, 1]
    assert default_steps(6, 3) == [6, 2]
    assert default_steps(16, 4) == [16, 8, 4]


def test_sweep_rows_and_errors(tmp_path):
    folder = train(_tiny(tmp_path, task="addition", steps=1, test_limit=2), progress=False).folder
    llm = LLM(folder, device="cpu")
    rows = run_sweep(llm, Addition(), model_name="t", policies=["low_confidence", "random"], steps=[6, 3, 2],
                     block_lengths=[6, 3], limit=4)
    combos = {(r["policy"], r["block_length"], r["steps"]) for r in rows}
    # steps 3 is not a multiple of 2 blocks: skipped for block 3
    assert combos == {(p, b, s) for p in ("low_confidence", "random") for b, s in
                      ((6, 6), (6, 3), (6, 2), (3, 6), (3, 2))}
    assert all(r["nfe"] == r["steps"] for r in rows)
    with pytest.raises(ValueError, match="must divide"):
        run_sweep(llm, Addition(), model_name="t", block_lengths=[4], limit=2)
    with pytest.raises(ValueError, match="unknown policy"):
        run_sweep(llm, Addition(), model_name="t", policies=["x"], limit=2)


def test_cli_eval_and_sweep_end_to_end(tmp_path, capsys):
    folder = train(_tiny(tmp_path, task="addition", steps=1, test_limit=2), progress=False).folder
    assert main(["eval", "--model", str(folder), "--task", "addition", "--limit", "5", "--steps", "3",
                 "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["n"] == 5 and rec["steps"] == 3 and rec["nfe"] == 3 and 0 <= rec["accuracy"] <= 1
    assert rec["tokens_per_forward"] == 2.0 and rec["wall_s"] > 0 and "failures" in rec
    assert main(["eval", "--model", str(folder), "--task", "addition", "--limit", "3"]) == 0
    assert "addition [low_confidence, 6 steps, block 6" in capsys.readouterr().out
    out = tmp_path / "quality"
    assert main(["sweep", "--model", str(folder), "--task", "addition", "--limit", "3", "--policies",
                 "low_confidence,entropy", "--steps", "6,2", "--block-lengths", "6", "--out", str(out),
                 "--name", "tiny"]) == 0
    assert "appended 4 rows" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "tiny.csv")))
    assert len(rows) == 4 and {r["policy"] for r in rows} == {"low_confidence", "entropy"}
    assert rows[0]["command"].startswith("diffuse-engine sweep") and rows[0]["commit"]
    for png in ("tiny_nfe.png", "tiny_seconds.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sweep", "--model", str(folder), "--task", "addition", "--limit", "2", "--policies",
                 "threshold,remdm-conf", "--steps", "6", "--block-lengths", "6", "--caches", "none,dual", "--out",
                 str(out), "--name", "adaptive", "--no-plot"]) == 0
    rows = list(csv.DictReader(open(out / "adaptive.csv")))
    knobs = [r["knob"] for r in rows if r["policy"] == "threshold"]
    assert knobs == [f"threshold={v:g}" for v in KNOBS["threshold"][1]] * 2
    assert {r["cache"] for r in rows} == {"none", "dual"} and all(r["steps"] == "" for r in rows if r["knob"])
    assert main(["eval", "--model", str(folder), "--task", "addition", "--limit", "2", "--policy", "threshold",
                 "--threshold", "0.5", "--cache", "prefix", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 2
    assert main(["sweep", "--model", str(folder), "--task", "addition", "--caches", "paged"]) == 2
    assert main(["eval", "--model", str(folder), "--task", "text-char", "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 2
    # bad input: exit status 2 with a message
    assert main(["eval", "--model", str(folder), "--task", "addition", "--block-length", "4"]) == 2
    assert "block_length" in capsys.readouterr().err
    assert main(["sweep", "--model", str(folder), "--task", "addition", "--steps", "x"]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing"), "--task", "addition"]) == 2
    assert "shipped models" in capsys.readouterr().err


def test_generation_defaults_file_is_validated(tmp_path):
    from diffuse_engine.errors import CheckpointError
    from diffuse_engine.sampling_params import read_generation_defaults

    assert read_generation_defaults(tmp_path) == {}
    path = tmp_path / "generation_defaults.json"
    path.write_text('{"gen_length": 6, "steps": 3}')
    assert read_generation_defaults(tmp_path) == {"gen_length": 6, "steps": 3}
    for text, message in (("{", "not valid JSON"), ("[1]", "JSON object"), ('{"gen_len": 6}', "does not know: gen_len"),
                          ('{"gen_length": 6, "block_length": 4}', "invalid sampling parameters")):
        path.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            read_generation_defaults(tmp_path)
