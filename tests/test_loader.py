"""Random checkpoints written in the Hugging Face layout load back bit-exactly, compute the architecture's
logits, and every kind of broken folder is refused with a clear CheckpointError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffuse_engine import presets
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.errors import CheckpointError
from diffuse_engine.loader import load_model
from diffuse_engine.models import build_model

PRESETS = ["llada-tiny", "dream-tiny"]


def _raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


def reference_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """fp64 forward written from the architecture descriptions, reading config.json and raw tensors only."""
    raw = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in _raw_tensors(folder).items()}
    if raw["model_type"] == "llada":
        d, heads, kv, layers = raw["d_model"], raw["n_heads"], raw["n_kv_heads"], raw["n_layers"]
        pre = "model.transformer."
        emb, final, head = pre + "wte.weight", pre + "ln_f.weight", pre + "ff_out.weight"
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj",
                 "down": "ff_out", "n1": "attn_norm", "n2": "ff_norm"}
        block = pre + "blocks.{}."
    else:
        d, heads, kv = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"]
        layers = raw["num_hidden_layers"]
        emb, final, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "n1": "input_layernorm",
                 "n2": "post_attention_layernorm"}
        block = "model.layers.{}."
    eps, theta, hd = raw["rms_norm_eps"], raw["rope_theta"], d // heads

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        bias = w.get(name + ".bias")
        return x @ w[name + ".weight"].T + (0 if bias is None else bias)

    seq = input_ids.shape[1]
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hd, 2).double() / hd)
    cos, sin = torch.cat([angle.cos(), angle.cos()], -1), torch.cat([angle.sin(), angle.sin()], -1)

    def rope(x: torch.Tensor) -> torch.Tensor:  # [b, s, h, hd], pairs (i, i + hd/2)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    h = w[emb][input_ids]
    b = input_ids.shape[0]
    for i in range(layers):
        p = block.format(i)
        x = norm(h, w[p + names["n1"] + ".weight"])
        q = rope(lin(x, p + names["q"]).view(b, seq, heads, hd))
        k = rope(lin(x, p + names["k"]).view(b, seq, kv, hd)).repeat_interleave(heads // kv, dim=2)
        v = lin(x, p + names["v"]).view(b, seq, kv, hd).repeat_interleave(heads // kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)  # no causal mask: bidirectional
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, seq, d)
        h = h + lin(attn, p + names["o"])
        x = norm(h, w[p + names["n2"] + ".weight"])
        gate, up = lin(x, p + names["gate"]), lin(x, p + names["up"])
        h = h + lin(gate * torch.sigmoid(gate) * up, p + names["down"])
    return norm(h, w[final]) @ w[head].T


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("shard_size", [None, 60_000])
def test_written_parameters_load_bit_exactly(tmp_path: Path, name: str, shard_size: int | None) -> None:
    preset = presets.from_name(name)
    folder = write_random_checkpoint(tmp_path / "m", name, seed=3, shard_size=shard_size)
    model, config, tok = load_model(folder)
    if shard_size is not None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(folder.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    written = build_model(preset.config).init_random_(3).state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(written)
    for key, tensor in written.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert config.replace(extra={}, torch_dtype="bfloat16") == preset.config
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
    assert tok is not None and tok.vocab_size == preset.config.vocab_size
    assert tok.token_to_id(tok.eos_token) == config.eos_token_id


@pytest.mark.parametrize("name", PRESETS)
def test_logits_match_an_independent_fp64_forward(tmp_path: Path, name: str) -> None:
    folder = write_random_checkpoint(tmp_path / "m", name, seed=1)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = reference_logits(folder, ids)
    scale = ref.abs().max().item()
    assert 1.0 < scale < 30.0  # logits of unit scale: a tolerance relative to 1 is meaningful
    # fp32: unit roundoff 6e-8; two layers of dot products over <= 192 terms, a softmax and RMSNorms keep the
    # accumulated error near 1e-6 of the logit scale. 1e-4 leaves ~100x margin while a wrong RoPE convention,
    # theta, bias or GQA head mapping moves logits by O(0.1 - 1).
    model, _, _ = load_model(folder, dtype="float32")
    with torch.no_grad():
        err32 = (model(ids).double() - ref).abs().max().item()
    assert err32 <= 1e-4 * scale, err32


@pytest.mark.parametrize("name", PRESETS)
def test_bf16_logits_match_fp64_forward_of_the_bf16_weights(tmp_path: Path, name: str) -> None:
    # A bf16 checkpoint, so that the fp64 reference uses exactly the weights the bf16 model holds.
    folder = write_random_checkpoint(tmp_path / "m", name, seed=1, dtype="bfloat16")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = reference_logits(folder, ids)
    assert load_model(folder)[0].dtype == torch.float32  # the CPU default, whatever the stored dtype
    model, _, _ = load_model(folder, dtype="bf16")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids).double()
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3) and every activation is rounded to it: the
    # logits alone are rounded to steps of 2^-5 near 4, and through two residual blocks the worst element drifts
    # to ~5% of the logit scale (mean ~0.4%). The bounds (10% max, 1% mean) leave 2-3x margin and stay far
    # below a wiring mistake: a wrong rope_theta or a missing RoPE gives ~100% max and ~15% mean error.
    err = (out - ref).abs()
    scale = ref.abs().max().item()
    assert err.max().item() <= 0.1 * scale, err.max().item()
    assert err.mean().item() <= 0.01 * scale, err.mean().item()


def test_checkpoints_are_deterministic(tmp_path: Path) -> None:
    a = write_random_checkpoint(tmp_path / "a", "dream-tiny", seed=5)
    b = write_random_checkpoint(tmp_path / "b", "dream-tiny", seed=5)
    c = write_random_checkpoint(tmp_path / "c", "dream-tiny", seed=6)
    for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_overwrite_is_explicit(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "llada-tiny", shard_size=60_000)
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        write_random_checkpoint(folder, "llada-tiny")
    write_random_checkpoint(folder, "llada-tiny", overwrite=True)  # stale shards and index are removed
    assert sorted(p.name for p in folder.glob("*.safetensors*")) == ["model.safetensors"]


def test_bare_config_derives_special_tokens(tmp_path: Path) -> None:
    config = presets.from_name("llada-tiny").config.replace(num_layers=1, eot_token_id=None)
    folder = write_random_checkpoint(tmp_path / "m", config)
    _, loaded, tok = load_model(folder)
    assert {t: tok.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>")} == {
        "<|startoftext|>": 256, "<|endoftext|>": 257, "<|mdm_mask|>": 261}
    assert loaded.eot_token_id is None and tok.token_to_id("<|eot_id|>") is None


# ------------------------------------------------------------------------------------- config resolution
def _edit_json(file: Path, **changes: object) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("name, eot", [("llada-tiny", 260), ("dream-tiny", 258)])
def test_eot_comes_from_the_tokenizer_when_the_config_lacks_it(tmp_path: Path, name: str, eot: int) -> None:
    folder = write_random_checkpoint(tmp_path / "m", name)
    data = json.loads((folder / "config.json").read_text())
    del data["eot_token_id"]  # the published config files do not have it
    (folder / "config.json").write_text(json.dumps(data))
    model, config, _ = load_model(folder)
    assert config.eot_token_id == eot and model.config.eot_token_id == eot
    (folder / "tokenizer.json").unlink()  # weights-only folders are valid
    model, config, tok = load_model(folder)
    assert tok is None and config.eot_token_id is None


@pytest.mark.parametrize("name, tie_key, head", [("llada-tiny", "weight_tying", "model.transformer.ff_out.weight"),
                                                 ("dream-tiny", "tie_word_embeddings", "lm_head.weight")])
def test_tied_config_ignores_a_stored_head(tmp_path: Path, name: str, tie_key: str, head: str) -> None:
    folder = write_random_checkpoint(tmp_path / "m", name)
    _edit_json(folder / "config.json", **{tie_key: True})
    # Older exports also persisted the rotary inverse frequencies, which the engine recomputes.
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    model, config, _ = load_model(folder)
    assert config.tie_word_embeddings and head not in model.state_dict()
    assert torch.equal(model.lm_head_weight(), _raw_tensors(folder)[
        "model.transformer.wte.weight" if name == "llada-tiny" else "model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------- errors
def _rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _missing_shard(folder: Path) -> None:
    write_random_checkpoint(folder, "llada-tiny", shard_size=60_000, overwrite=True)
    sorted(folder.glob("model-00002-of-*.safetensors"))[0].unlink()


CASES = {
    "missing folder": (lambda f: f.rename(f.with_name("gone")), r"does not exist"),
    "missing config.json": (lambda f: (f / "config.json").unlink(), r"has no config\.json"),
    "corrupt config.json": (lambda f: (f / "config.json").write_text('{"d_model": 64,'),
                            r"config\.json is not valid JSON"),
    "unknown model_type": (lambda f: _edit_json(f / "config.json", model_type="gpt2", architectures=["GPT2LM"]),
                           r"config\.json has model_type 'gpt2'.*supported are LLaDA"),
    "no safetensors": (lambda f: (f / "model.safetensors").unlink(),
                       r"has neither model\.safetensors nor model\.safetensors\.index\.json"),
    "truncated safetensors": (_truncate, r"model\.safetensors is not a readable safetensors file"),
    "index names a missing shard": (_missing_shard, r"names the shard model-00002-of-\d{5}\.safetensors, which "
                                                    r"does not exist"),
    "wrong shape": (lambda f: _rewrite_weights(f, lambda t: t.update({"model.transformer.blocks.1.q_proj.weight":
                                                                      torch.zeros(32, 64)})),
                    r"model\.safetensors: tensor 'model\.transformer\.blocks\.1\.q_proj\.weight' has shape \(32, 64\) "
                    r"but the config implies \(64, 64\)"),
    "missing tensor": (lambda f: _rewrite_weights(f, lambda t: t.pop("model.transformer.blocks.0.ff_norm.weight")),
                       r"lacks 1 tensor\(s\) that the config requires: model\.transformer\.blocks\.0\.ff_norm\.weight"),
    "unexpected tensor": (lambda f: _rewrite_weights(f, lambda t: t.update({"model.transformer.blocks.2.x.weight":
                                                                            torch.zeros(2)})),
                          r"holds 1 tensor\(s\) that the config does not imply: model\.transformer\.blocks\.2\.x"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_folders_raise_checkpoint_error(tmp_path: Path, case: str) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "llada-tiny")
    breaker, words = CASES[case]
    breaker(folder)
    with pytest.raises(CheckpointError, match=words):
        load_model(folder)


def test_missing_tensors_are_listed_up_to_five(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "dream-tiny")
    _rewrite_weights(folder, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.1.")]])
    five = r"(model\.layers\.1\.[\w.]+, ){4}model\.layers\.1\.[\w.]+"
    with pytest.raises(CheckpointError, match=rf"lacks 12 tensor\(s\) that the config requires: {five} and 7 more\.$"):
        load_model(folder)


@pytest.mark.parametrize("dtype", ["int8", "float8", "half-precision", torch.int32])
def test_bad_dtype(tmp_path: Path, dtype: object) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "llada-tiny")
    with pytest.raises(ValueError, match=r"dtype .* is not supported; use one of float32, fp32"):
        load_model(folder, dtype=dtype)
    for alias in ("fp16", "torch.float64"):
        assert load_model(folder, dtype=alias)[0].dtype == {"fp16": torch.float16, "torch.float64": torch.float64}[
            alias]
