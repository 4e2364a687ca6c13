"""SDAR (block diffusion on the Qwen3 layout): config.json round trips with the published key names, random
checkpoints load back under the Qwen3 parameter names, and the plain forward is exactly an independent fp64
implementation of block-causal attention with per-head q/k RMSNorm, GQA, an explicit head dim and RoPE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffuse_engine import LLM, SamplingParams, presets
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.config import ModelConfig
from diffuse_engine.entrypoints.cli import main
from diffuse_engine.loader import load_model
from diffuse_engine.models import SDARModel, TokenLayout, build_model
from diffuse_engine.models.sdar import SDARLayer

TINY = presets.from_name("sdar-tiny").config
B = TINY.block_size

# A config.json in the layout of JetLM/SDAR-*-Chat (Qwen3 keys), shrunk; debug / ep_size / max_window_layers are
# keys of the published files that the engine does not use and must carry through unchanged.
SDAR_CONFIG_JSON = {
    "architectures": ["SDARForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "block_size": 4, "bos_token_id": 256, "debug": False, "eos_token_id": 256, "ep_size": 1, "head_dim": 32,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192,
    "mask_token_id": 259, "max_position_embeddings": 512, "max_window_layers": 2, "model_type": "sdar",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "use_sliding_window": False,
    "vocab_size": 320,
}


def _qwen3_names(layers: int, *, bias: bool = False, tied: bool = False) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(p + f"self_attn.{proj}.weight")
            if bias:
                names.append(p + f"self_attn.{proj}.bias")
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    return names if tied else [*names, "lm_head.weight"]


# ------------------------------------------------------------------------------------------------ config
def test_published_config_parses_and_round_trips() -> None:
    c = ModelConfig.from_hf(SDAR_CONFIG_JSON)
    assert (c.arch, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == ("sdar", 64, 2, 4, 2)
    assert c.head_dim == 32 != c.hidden_size // c.num_heads and c.block_size == 4 and c.qk_norm
    assert not c.shifted_logits and not c.qkv_bias and not c.tie_word_embeddings
    assert (c.mask_token_id, c.eos_token_id, c.bos_token_id, c.pad_token_id) == (259, 256, 256, None)
    assert c.extra == {"debug": False, "ep_size": 1, "max_window_layers": 2}
    assert c.to_hf() == SDAR_CONFIG_JSON  # every key, with its exact name and value
    assert ModelConfig.from_hf(c.to_hf()) == c
    # Detected by the architecture name alone; block size and mask id default when absent.
    raw = {k: v for k, v in SDAR_CONFIG_JSON.items() if k not in ("model_type", "block_size", "mask_token_id")}
    c = ModelConfig.from_hf({**raw, "vocab_size": 151936})
    assert c.arch == "sdar" and c.block_size == 4 and c.mask_token_id == 151669


@pytest.mark.parametrize("changes", [{}, {"qkv_bias": True}, {"tie_word_embeddings": True},
                                     {"explicit_head_dim": None, "block_size": None}, {"block_size": 16}])
def test_configs_round_trip_and_count_parameters(changes: dict) -> None:
    config = TINY.replace(**changes)
    if "explicit_head_dim" in changes:
        assert config.head_dim == 16 and config.explicit_head_dim == 16 and config.block_size == 4
    hf = config.to_hf()
    assert hf["model_type"] == "sdar" and hf["architectures"] == ["SDARForCausalLM"]
    assert hf["head_dim"] == config.head_dim and hf["block_size"] == config.block_size
    assert hf["attention_bias"] is config.qkv_bias and "qkv_bias" not in hf and "include_qkv_bias" not in hf
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == config
    model = build_model(config, meta=True)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    assert list(model.state_dict()) == _qwen3_names(2, bias=config.qkv_bias, tied=config.tie_word_embeddings)


def test_real_size_preset() -> None:
    c = presets.from_name("sdar-1.7b").config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2048, 28, 16, 8, 128)
    assert (c.intermediate_size, c.vocab_size, c.mask_token_id, c.block_size) == (6144, 151936, 151669, 4)
    assert c.num_parameters() == 2_031_739_904  # ~4.06 GB in bf16, the size of SDAR-1.7B-Chat's safetensors


@pytest.mark.parametrize("block_size", [0, -4, True, 2.5, "4"])
def test_bad_block_size_is_refused(block_size: object) -> None:
    with pytest.raises(ValueError, match=r"block_size must be a positive integer"):
        TINY.replace(block_size=block_size)
    with pytest.raises(ValueError, match=r"block_size must be a positive integer"):
        ModelConfig.from_hf({**SDAR_CONFIG_JSON, "block_size": block_size})


def test_other_bad_configs_are_refused() -> None:
    dream = presets.from_name("dream-tiny").config
    with pytest.raises(ValueError, match=r"block_size is only supported for arch 'sdar'"):
        dream.replace(block_size=4)
    with pytest.raises(ValueError, match=r"explicit_head_dim is only supported for arch 'sdar'"):
        dream.replace(explicit_head_dim=32)
    with pytest.raises(ValueError, match=r"head_dim \(15\) must be even"):
        TINY.replace(explicit_head_dim=15)
    with pytest.raises(ValueError, match=r"lacks the required key 'head_dim'"):
        ModelConfig.from_hf({k: v for k, v in SDAR_CONFIG_JSON.items() if k != "head_dim"})
    for key, value, words in [("rope_scaling", {"type": "yarn"}, "RoPE scaling"),
                              ("use_sliding_window", True, "sliding-window"), ("hidden_act", "gelu", "silu")]:
        with pytest.raises(ValueError, match=words):
            ModelConfig.from_hf({**SDAR_CONFIG_JSON, key: value})
    assert SamplingParams().resolved_remasking("sdar") == "low_confidence"


# -------------------------------------------------------------------------------------------- checkpoints
def _raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


@pytest.mark.parametrize("shard_size", [None, 60_000])
def test_random_checkpoint_loads_back(tmp_path: Path, shard_size: int | None) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "sdar-tiny", seed=3, shard_size=shard_size)
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "sdar" and hf["head_dim"] == 32 and hf["block_size"] == 4
    assert sorted(_raw_tensors(folder)) == sorted(_qwen3_names(2))
    model, config, tok = load_model(folder)
    assert isinstance(model, SDARModel) and config.replace(extra={}, torch_dtype="bfloat16") == TINY
    written = build_model(TINY).init_random_(3).state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(written) == _qwen3_names(2)
    for key, tensor in written.items():
        assert torch.equal(loaded[key], tensor), key
    for key in ("model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        assert loaded[key].shape == (32,) and bool((loaded[key] == 1).all())
    assert tok is not None and tok.token_to_id("<|MASK|>") == config.mask_token_id == 259
    assert tok.token_to_id("<|im_end|>") == config.eot_token_id and tok.token_to_id(tok.eos_token) == 256
    assert [blk.layer for blk in model.blocks()] == [0, 1] and all(isinstance(b, SDARLayer) for b in model.blocks())


def test_init_random_cli_and_llm_load(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sdar"
    assert main(["init-random", "--preset", "sdar-tiny", "--out", str(out), "--seed", "2"]) == 0
    assert "sdar-tiny" in capsys.readouterr().out
    llm = LLM(out, device="cpu")
    assert isinstance(llm.model, SDARModel) and llm.model.config.block_size == 4
    ref = build_model(TINY).init_random_(2).state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in llm.model.state_dict().items())


def test_ids_missing_from_config_come_from_the_tokenizer(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "sdar-tiny")
    hf = json.loads((folder / "config.json").read_text())
    del hf["eot_token_id"], hf["mask_token_id"]  # as in JetLM/SDAR-4B-Chat's config.json
    (folder / "config.json").write_text(json.dumps({**hf, "vocab_size": 151936}))
    tensors = load_file(str(folder / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.zeros(151936, 64)
    save_file(tensors, str(folder / "model.safetensors"))
    _, config, _ = load_model(folder)
    assert config.mask_token_id == 259 and config.eot_token_id == 258


def test_tied_config_ignores_a_stored_head(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", "sdar-tiny")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    model, config, _ = load_model(folder)
    assert config.tie_word_embeddings and "lm_head.weight" not in model.state_dict()
    assert torch.equal(model.lm_head_weight(), _raw_tensors(folder)["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------- forward
def reference_logits(folder: Path, ids: torch.Tensor, key_valid: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 SDAR forward from config.json and the raw tensors: explicit block-causal boolean mask over columns,
    per-head q/k RMSNorm before RoPE, GQA by head index // group, biases where stored, untied or tied head."""
    raw = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in _raw_tensors(folder).items()}
    heads, kv, hd, eps = raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"], raw["rms_norm_eps"]
    bsz, seq = ids.shape
    block = raw["block_size"]
    if positions is None:
        positions = torch.arange(seq).expand(bsz, seq)
    if key_valid is None:
        key_valid = torch.ones(bsz, seq, dtype=torch.bool)
    col = torch.arange(seq)
    allowed = (col[None, :] // block) <= (col[:, None] // block)  # [query, key]

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        bias = w.get(name + ".bias")
        return x @ w[name + ".weight"].T + (0 if bias is None else bias)

    inv = raw["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope(x: torch.Tensor) -> torch.Tensor:  # x [b, s, h, hd]; dims i and i + hd/2 rotate together
        ang = positions.double()[..., None] * inv  # [b, s, hd/2]
        c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    h = w["model.embed_tokens.weight"][ids]
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = rope(norm(lin(x, p + "self_attn.q_proj").view(bsz, seq, heads, hd), w[p + "self_attn.q_norm.weight"]))
        k = rope(norm(lin(x, p + "self_attn.k_proj").view(bsz, seq, kv, hd), w[p + "self_attn.k_norm.weight"]))
        v = lin(x, p + "self_attn.v_proj").view(bsz, seq, kv, hd)
        out = torch.zeros(bsz, seq, heads, hd, dtype=torch.float64)
        for b in range(bsz):
            for hh in range(heads):
                g = hh // (heads // kv)
                scores = torch.einsum("qd,kd->qk", q[b, :, hh], k[b, :, g]) / math.sqrt(hd)
                visible = allowed & key_valid[b][None, :]
                scores = scores.masked_fill(~visible, float("-inf"))
                probs = torch.where(visible.any(-1, keepdim=True), scores.softmax(-1), 0.0)
                out[b, :, hh] = probs @ v[b, :, g]
        h = h + lin(out.reshape(bsz, seq, heads * hd), p + "self_attn.o_proj")
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        gate, up = lin(x, p + "mlp.gate_proj"), lin(x, p + "mlp.up_proj")
        h = h + lin(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    head = w["model.embed_tokens.weight"] if raw["tie_word_embeddings"] else w["lm_head.weight"]
    return norm(h, w["model.norm.weight"]) @ head.T


def _fp64_folder(tmp_path: Path, config: ModelConfig, seed: int = 1) -> Path:
    """An fp64 checkpoint whose norm weights (q_norm / k_norm included) are random, so that the weights and the
    order of q/k norm and RoPE matter."""
    folder = write_random_checkpoint(tmp_path / "m", config, seed=seed, dtype="float64")
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = 0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _ids(bsz: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (bsz, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("changes", [{}, {"qkv_bias": True, "tie_word_embeddings": True}])
def test_forward_matches_an_independent_fp64_implementation(tmp_path: Path, changes: dict) -> None:
    folder = _fp64_folder(tmp_path, TINY.replace(**changes))
    model, _, _ = load_model(folder, dtype="float64")
    ids = _ids(2, 22)  # 5 full blocks and a partial one
    ref = reference_logits(folder, ids)
    scale = ref.abs().max().item()
    assert 1.0 < scale < 100.0
    with torch.no_grad():
        got = model(ids)
    assert got.dtype == torch.float64
    assert (got - ref).abs().max().item() <= 1e-10 * scale
    # The mask matters: a bidirectional forward of the same weights is far from the reference.
    layout = TokenLayout.padded(2, 22)
    with torch.no_grad():
        flat = model.hidden_states(ids.reshape(-1), torch.arange(22).repeat(2), layout)
        bidirectional = model.logits_from_hidden(flat).view(2, 22, -1)
    assert (bidirectional - ref).abs().max().item() > 1e-3 * scale


def test_block_causality() -> None:
    model = build_model(TINY, dtype=torch.float64).init_random_(0).eval()
    ids = _ids(1, 16, seed=5)
    with torch.no_grad():
        base = model(ids)[0]
        for j in range(16 // B):
            later = ids.clone()
            later[0, j * B:] = (later[0, j * B:] + 7) % 256  # blocks >= j change
            out = model(later)[0]
            assert torch.equal(out[: j * B], base[: j * B]), f"earlier blocks saw block {j}"
            p = j * B + 1  # one token inside block j
            one = ids.clone()
            one[0, p] = (one[0, p] + 11) % 256
            out = model(one)[0]
            assert torch.equal(out[: j * B], base[: j * B])
            others = [r for r in range(j * B, (j + 1) * B) if r != p]
            assert (out[others] - base[others]).abs().amax(-1).min().item() > 1e-6, "a block is bidirectional"


def test_padded_batches(tmp_path: Path) -> None:
    folder = _fp64_folder(tmp_path, TINY, seed=2)
    model, _, _ = load_model(folder, dtype="float64")
    long, short = _ids(1, 14, seed=1), _ids(1, 9, seed=2)
    with torch.no_grad():
        want_long, want_short = model(long)[0], model(short)[0]
        # Right padding: pad keys are hidden, real rows are exactly the unpadded forward.
        ids = torch.cat([long, torch.cat([short, torch.full((1, 5), 7)], 1)])
        mask = torch.tensor([[1] * 14, [1] * 9 + [0] * 5])
        got = model(ids, attention_mask=mask)
        assert torch.allclose(got[0], want_long, rtol=0, atol=1e-12)
        assert torch.allclose(got[1, :9], want_short, rtol=0, atol=1e-12)
        assert torch.allclose(got, reference_logits(folder, ids, mask.bool()), rtol=0, atol=1e-9)
        # Left padding by whole blocks, positions restarting at the first real token: blocks stay aligned.
        pad = 2 * B
        ids = torch.cat([torch.full((1, pad), 7), short], 1)
        mask = torch.tensor([[0] * pad + [1] * 9])
        pos = (torch.arange(pad + 9) - pad).clamp(min=0)[None]
        got = model(ids, attention_mask=mask, position_ids=pos)
        assert torch.allclose(got[0, pad:], want_short, rtol=0, atol=1e-12)
        ref = reference_logits(folder, ids, mask.bool(), pos)
        assert torch.allclose(got[0, pad:], ref[0, pad:], rtol=0, atol=1e-9)
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))


def test_attention_goes_through_the_layer_hook() -> None:
    """An attention plan on the layout receives every layer's q, k (before RoPE), v and rotary tables under that
    layer's index."""
    model = build_model(TINY, dtype=torch.float64).init_random_(4).eval()
    ids = _ids(1, 12, seed=3)[0]

    class Plan:
        layers: list[int] = []

        def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
            self.layers.append(layer)
            assert q.shape == (12, 4, 32) and k.shape == v.shape == (12, 2, 32)
            from diffuse_engine import ops
            from diffuse_engine.models.layers import apply_rope

            q, k = (apply_rope(x, rope.cos, rope.sin, rope.full_precision) for x in (q, k))
            return ops.attention(q, k, v, TokenLayout.packed([12]), block_size=B)

    plan = Plan()
    with torch.no_grad():
        h = model.hidden_states(ids, torch.arange(12), TokenLayout.packed([12], kv=plan))
        want = model(ids[None])[0]
    assert plan.layers == [0, 1]
    assert torch.allclose(model.logits_from_hidden(h), want, rtol=0, atol=1e-12)
