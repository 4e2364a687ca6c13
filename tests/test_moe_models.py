"""The mixture-of-experts families, LLaDA-MoE and LLaDA2.x: config.json layouts, checkpoints in the published
per-expert layout, the fp64 forward against an independent re-expression of the published architecture (per layer:
routing and expert outputs, then logits), LLaDA2's exact block cache, every cache mode and policy, batch invariance,
and the command line."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from oracles_parallel import sdar_generate
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffuse_engine import LLM, SamplingParams, ops, presets
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.config import ModelConfig
from diffuse_engine.entrypoints.cli import main
from diffuse_engine.errors import CheckpointError
from diffuse_engine.loader import load_model
from diffuse_engine.models import LLaDA2MoeModelLM, LLaDAMoEModelLM, build_model
from diffuse_engine.models.moe import Router, StackedExperts

MOE = presets.from_name("llada-moe-tiny").config
L2 = presets.from_name("llada2-tiny").config

# The published LLaDA2.0-mini config.json (as quoted in public loaders' tests) and a LLaDA-MoE one in its layout.
LLADA2_MINI_JSON = {
    "architectures": ["LLaDA2MoeModelLM"], "dtype": "bfloat16", "first_k_dense_replace": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
    "max_position_embeddings": 32768, "model_type": "llada2_moe", "moe_intermediate_size": 512,
    "moe_router_enable_expert_bias": True, "n_group": 8, "norm_head": False, "norm_topk_prob": True,
    "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8, "num_hidden_layers": 20,
    "num_key_value_heads": 4, "num_shared_experts": 1, "output_router_logits": False, "pad_token_id": 156892,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_theta": 600000, "routed_scaling_factor": 2.5,
    "score_function": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "use_qk_norm": True,
    "use_qkv_bias": False, "vocab_size": 157184,
}
LLADA_MOE_JSON = {
    "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 16, "dense_intermediate_size": 8192,
    "expert_intermediate_size": 1024, "shared_expert_intermediate_size": None, "num_experts": 64,
    "num_experts_per_tok": 8, "moe_layer_freq": [1] * 16, "qk_layernorm": True, "rope_theta": 50000,
    "partial_rotary_factor": 1.0, "max_position_embeddings": 8192, "vocab_size": 157184, "eos_token_id": 156892,
    "pad_token_id": 156892, "norm_topk_prob": False, "routed_scaling_factor": 1, "router_num_group": -2,
    "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": None, "attention_bias": False,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and stay fast when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("raw", [LLADA2_MINI_JSON, LLADA_MOE_JSON], ids=["llada2-mini", "llada-moe"])
def test_published_configs_parse_and_round_trip(raw):
    c = ModelConfig.from_hf(raw)
    if c.arch == "llada2":
        assert c == presets.from_name("llada2-mini").config.replace(torch_dtype="bfloat16", eot_token_id=None,
                                                                    extra={"dtype": "bfloat16"})
        assert (c.block_size, c.rotary_dim, c.mask_token_id, c.eos_token_id) == (32, 64, 156895, 156892)
        assert c.num_parameters() == 16_255_643_392 and c.active_parameters() == 1_432_973_056
    else:
        assert (c.arch, c.num_experts, c.num_shared_experts, c.first_k_dense_replace) == ("llada_moe", 64, 0, 0)
        assert c.block_size is None and c.rotary_dim == 128 and c.mask_token_id == 156895
        assert c.extra["norm_topk_prob"] is False and c.extra["router_num_group"] == -2  # unread, carried
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c
    unread = "moe_router_enable_expert_bias"  # null in the LLaDA-MoE file, written back as false
    assert {k: v for k, v in c.to_hf().items() if k in raw and k != unread} == \
        {k: v for k, v in raw.items() if k != unread}


@pytest.mark.parametrize("name", ["llada-moe-tiny", "llada2-tiny", "llada-moe-7b-a1b", "llada2-flash"])
def test_presets_round_trip_and_count_parameters(name):
    c = presets.from_name(name).config
    assert ModelConfig.from_hf(c.to_hf()) == c
    if "tiny" in name:
        for variant in (c, c.replace(num_shared_experts=1, first_k_dense_replace=1, expert_bias=True)):
            model = build_model(variant, meta=True)
            assert variant.num_parameters() == sum(p.numel() for p in model.parameters())
    assert c.active_parameters() < c.num_parameters()


@pytest.mark.parametrize("changes, words", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok \\(9\\) must be at most num_experts"),
    ({"n_group": 3}, "n_group \\(3\\) must divide num_experts"),
    ({"topk_group": 5}, "topk_group \\(5\\) must be at most n_group"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "cannot hold num_experts_per_tok"),
    ({"score_function": "relu"}, "score_function must be one of"),
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor must be a finite positive"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size must be a positive integer"),
    ({"first_k_dense_replace": 3}, "first_k_dense_replace \\(3\\) exceeds num_layers"),
    ({"partial_rotary_factor": 0.3}, "partial_rotary_factor 0.3 gives a rotary dim"),
])
def test_inconsistent_moe_configs_are_refused(changes, words):
    with pytest.raises(ValueError, match=words):
        L2.replace(**changes)


def test_bad_config_json_names_the_key():
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        ModelConfig.from_hf({**LLADA2_MINI_JSON, "num_experts": 0})
    with pytest.raises(ValueError, match="use_bias=True"):
        ModelConfig.from_hf({**LLADA2_MINI_JSON, "use_bias": True})
    with pytest.raises(ValueError, match="score_function"):
        ModelConfig.from_hf({**LLADA2_MINI_JSON, "score_function": "tanh"})
    with pytest.raises(ValueError, match="moe_layer_freq must put its dense layers"):
        ModelConfig.from_hf({**LLADA_MOE_JSON, "moe_layer_freq": [1, 0] + [1] * 14})
    with pytest.raises(ValueError, match="shared_expert_intermediate_size \\(1000\\) must be a multiple"):
        ModelConfig.from_hf({**LLADA_MOE_JSON, "shared_expert_intermediate_size": 1000})
    with pytest.raises(ValueError, match="num_experts is only supported for arch"):
        presets.from_name("llada-tiny").config.replace(num_experts=4)
    with pytest.raises(ValueError, match="n_group must be 1 for arch 'llada_moe'"):
        MOE.replace(n_group=2)


# ---------------------------------------------------------------------------------------------- checkpoints
def _raw(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


@pytest.mark.parametrize("name", ["llada-moe-tiny", "llada2-tiny"])
def test_checkpoint_holds_published_expert_names_and_loads_back(tmp_path, name):
    config = presets.from_name(name).config.replace(num_shared_experts=1, expert_bias=True)
    folder = write_random_checkpoint(tmp_path / "m", config, seed=4, shard_size=40_000)
    raw = _raw(folder)
    p = "model.layers.1.mlp."
    for j in range(8):
        assert raw[f"{p}experts.{j}.gate_proj.weight"].shape == (32, 64)
        assert raw[f"{p}experts.{j}.down_proj.weight"].shape == (64, 32)
    assert not any(k.endswith("experts.gate_proj") for k in raw)
    if name == "llada2-tiny":
        assert {f"{p}gate.weight", f"{p}gate.expert_bias", f"{p}shared_experts.up_proj.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.word_embeddings.weight",
                "model.layers.0.attention.query_key_value.weight"} <= set(raw)
    else:
        assert {f"{p}gate.weight", f"{p}expert_bias", "model.layers.1.shared_expert.up_proj.weight",
                "model.layers.0.self_attn.q_norm.weight"} <= set(raw)
    model, loaded, tok = load_model(folder)
    assert isinstance(model, LLaDA2MoeModelLM if name == "llada2-tiny" else LLaDAMoEModelLM)
    written = build_model(config).init_random_(4).state_dict()
    assert all(torch.equal(t, written[k]) for k, t in model.state_dict().items())
    stacked = model.state_dict()[f"{p}experts.up_proj"]
    assert all(torch.equal(stacked[j], raw[f"{p}experts.{j}.up_proj.weight"]) for j in range(8))
    assert tok.token_to_id("<|mask|>") == loaded.mask_token_id and tok.token_to_id("<|role_end|>") == 259
    hf = json.loads((folder / "config.json").read_text())
    del hf["mask_token_id"], hf["eot_token_id"]  # the published files name neither
    (folder / "config.json").write_text(json.dumps(hf))
    _, again, _ = load_model(folder)
    assert (again.mask_token_id, again.eot_token_id) == (260, 259)
    assert not (folder / "generation_defaults.json").exists()  # a bare config has no published settings
    folder = write_random_checkpoint(tmp_path / "p", name)
    assert json.loads((folder / "generation_defaults.json").read_text()) == presets.from_name(name).generation_defaults


def test_missing_or_misshapen_expert_tensor_is_named(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m", "llada2-tiny", seed=1)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.experts.5.up_proj.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(folder)
    tensors["model.layers.1.mlp.experts.5.up_proj.weight"] = torch.zeros(31, 64)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj\.weight' has shape \(31, 64\)"):
        load_model(folder)


# -------------------------------------------------------------------------------------------- ops.moe_experts
def test_moe_experts_is_the_weighted_sum_of_the_chosen_experts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 12, generator=g, dtype=torch.float64)
    wg, wu = torch.randn(2, 5, 7, 12, generator=g, dtype=torch.float64)
    wd = torch.randn(5, 12, 7, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(19)])
    w = torch.rand(19, 3, generator=g, dtype=torch.float64)
    want = torch.stack([sum(w[n, j] * wd[e] @ (torch.nn.functional.silu(wg[e] @ x[n]) * (wu[e] @ x[n]))
                            for j, e in enumerate(ids[n].tolist())) for n in range(19)])
    torch.testing.assert_close(ops.moe_experts(x, wg, wu, wd, ids, w), want, rtol=0, atol=1e-12)
    out32 = ops.moe_experts(x.float(), wg.float(), wu.float(), wd.float(), ids, w.float())
    assert out32.dtype == torch.float32
    assert torch.equal(ops.moe_experts(x.float()[:5], wg.float(), wu.float(), wd.float(), ids[:5], w.float()[:5]),
                       out32[:5])  # a token's output does not depend on the others


# ------------------------------------------------------------------------------------- the fp64 forward
def _fp64_folder(tmp_path: Path, config: ModelConfig, seed: int = 1) -> Path:
    """An fp64 checkpoint with random norm weights and large random expert biases (so that the bias changes
    which experts are picked)."""
    folder = write_random_checkpoint(tmp_path / "m", config, seed=seed, dtype="float64")
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = 0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64)
        elif name.endswith("expert_bias"):
            tensors[name] = 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _route(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, raw: dict, llada2: bool):
    """The published router of one token ``x``, written out: (picked experts, weights, picks without bias)."""
    logits = w[p + "gate.weight"] @ x
    if llada2 and raw["score_function"] == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
    else:
        scores = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
    bias = w.get(p + ("gate.expert_bias" if llada2 else "expert_bias"))
    choice = scores + bias if bias is not None else scores
    e, k = len(scores), raw["num_experts_per_tok"]
    experts = list(range(e))
    if llada2:
        size = e // raw["n_group"]
        group_score = [sum(sorted(choice[g * size:(g + 1) * size].tolist())[-2:]) for g in range(raw["n_group"])]
        kept = sorted(range(raw["n_group"]), key=lambda g: -group_score[g])[:raw["topk_group"]]
        experts = [j for j in experts if j // size in kept]
    picked = sorted(experts, key=lambda j: -float(choice[j]))[:k]
    unbiased = sorted(experts, key=lambda j: -float(scores[j]))[:k]
    if llada2:
        weights = torch.stack([scores[j] for j in picked])
        if raw["norm_topk_prob"] and k > 1:
            weights = weights / (weights.sum() + 1e-20)
        weights = weights * raw["routed_scaling_factor"]
    else:
        weights = torch.stack([choice[j] for j in picked])  # LLaDA-MoE weighs by the biased probabilities
    return picked, weights, unbiased


def _swiglu(x: torch.Tensor, w: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    gate, up = w[p + "gate_proj.weight"] @ x, w[p + "up_proj.weight"] @ x
    return w[p + "down_proj.weight"] @ (gate * torch.sigmoid(gate) * up)


def _attention(q, k, v, raw: dict, block: int | None) -> torch.Tensor:
    """Per query token and head: softmax over the keys it may see (all, or blocks <= its own) of q.k / sqrt(D)."""
    seq, heads, hd = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for t in range(seq):
        visible = [s for s in range(seq) if block is None or s // block <= t // block]
        for hh in range(heads):
            scores = torch.stack([q[t, hh] @ k[s, hh // group] for s in visible]) / math.sqrt(hd)
            probs = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            out[t, hh] = sum(pr * v[s, hh // group] for pr, s in zip(probs, visible, strict=True))
    return out


def _rope(x: torch.Tensor, raw: dict, hd: int) -> torch.Tensor:
    """Partial RoPE of ``x`` ``[seq, heads, hd]`` at positions 0..seq-1: rotate_half over the first ``rot`` dims."""
    rot = int(hd * raw.get("partial_rotary_factor", 1.0))
    out = x.clone()
    for t in range(x.shape[0]):
        ang = t * raw["rope_theta"] ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        c, s = torch.cos(ang), torch.sin(ang)
        x1, x2 = x[t, :, : rot // 2], x[t, :, rot // 2: rot]
        out[t, :, : rot // 2], out[t, :, rot // 2: rot] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def reference(folder: Path, ids: list[int]):
    """fp64 forward of one sequence from config.json and the raw (per-expert) tensors: logits, and per MoE layer the
    picked experts, weights, picks without bias and routed-expert output of every token."""
    raw = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in _raw(folder).items()}
    llada2 = raw["model_type"] == "llada2_moe"
    heads, kv, d, eps = raw["num_attention_heads"], raw["num_key_value_heads"], raw["hidden_size"], raw["rms_norm_eps"]
    hd = raw.get("head_dim") or d // heads
    block = raw.get("block_size", 32) if llada2 else None
    dense = raw["first_k_dense_replace"] if llada2 else raw["moe_layer_freq"].count(0)

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    h = w["model.word_embeddings.weight" if llada2 else "model.embed_tokens.weight"][ids]
    seq, records = len(ids), {}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        if llada2:
            qkv = x @ w[p + "attention.query_key_value.weight"].T + w.get(p + "attention.query_key_value.bias", 0)
            q, k, v = qkv.view(seq, heads + 2 * kv, hd).split([heads, kv, kv], dim=1)
            qn, kn, o = (w[p + f"attention.{n}"] for n in ("query_layernorm.weight", "key_layernorm.weight",
                                                            "dense.weight"))
        else:
            q, k, v = ((x @ w[p + f"self_attn.{n}_proj.weight"].T).view(seq, -1, hd) for n in "qkv")
            qn, kn, o = (w[p + f"self_attn.{n}"] for n in ("q_norm.weight", "k_norm.weight", "o_proj.weight"))
        q, k = _rope(rms(q, qn), raw, hd), _rope(rms(k, kn), raw, hd)
        h = h + _attention(q, k, v, raw, block).reshape(seq, -1) @ o.T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        if i < dense:
            h = h + torch.stack([_swiglu(x[t], w, p + "mlp.") for t in range(seq)])
            continue
        rows = []
        for t in range(seq):
            picked, weights, unbiased = _route(x[t], w, p + "mlp.", raw, llada2)
            routed = sum(wt * _swiglu(x[t], w, p + f"mlp.experts.{j}.") for j, wt in zip(picked, weights, strict=True))
            shared = p + ("mlp.shared_experts." if llada2 else "shared_expert.")
            extra = _swiglu(x[t], w, shared) if shared + "up_proj.weight" in w else 0
            rows.append((picked, weights, unbiased, routed, routed + extra))
        records[i] = rows
        h = h + torch.stack([r[4] for r in rows])
    head = w["model.word_embeddings.weight" if llada2 else "model.embed_tokens.weight"] \
        if raw["tie_word_embeddings"] else w["lm_head.weight"]
    return rms(h, w["model.norm.weight"]) @ head.T, records


def _hooked(model):
    """Run ``model`` while recording, per layer, its router's (ids, weights) and its routed experts' output."""
    seen: dict[int, dict] = {}
    handles = []
    for layer in model.blocks():
        for m in layer.modules():
            if isinstance(m, (Router, StackedExperts)):
                key = "route" if isinstance(m, Router) else "out"
                handles.append(m.register_forward_hook(
                    lambda _m, _i, out, i=layer.layer, key=key: seen.setdefault(i, {}).__setitem__(key, out)))
    return seen, handles


@pytest.mark.parametrize("name, changes", [
    ("llada2-tiny", {}),
    ("llada2-tiny", {"qkv_bias": True, "tie_word_embeddings": True, "score_function": "softmax", "n_group": 2,
                     "topk_group": 1}),
    ("llada-moe-tiny", {}),
    ("llada-moe-tiny", {"expert_bias": True, "num_shared_experts": 1, "first_k_dense_replace": 1,
                        "partial_rotary_factor": 0.5}),
])
def test_forward_equals_the_published_architecture_layer_by_layer(tmp_path, name, changes):
    folder = _fp64_folder(tmp_path, presets.from_name(name).config.replace(**changes))
    model, config, _ = load_model(folder, dtype="float64")
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    want, records = reference(folder, ids)
    seen, handles = _hooked(model)
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0]
    for h in handles:
        h.remove()
    assert set(seen) == set(records) == set(range(config.first_k_dense_replace, config.num_layers))
    bias_mattered = False
    for i, rows in records.items():
        ids_got, w_got = seen[i]["route"]
        assert ids_got.tolist() == [r[0] for r in rows], f"layer {i}: other experts picked"
        torch.testing.assert_close(w_got, torch.stack([r[1] for r in rows]), rtol=0, atol=1e-12)
        torch.testing.assert_close(seen[i]["out"], torch.stack([r[3] for r in rows]), rtol=1e-10, atol=1e-10)
        bias_mattered |= any(r[0] != r[2] for r in rows)
    assert bias_mattered == (config.expert_bias and config.arch == "llada2") or config.arch == "llada_moe"
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-10 * scale


# ------------------------------------------------------------------------------------------------ the engine
@functools.cache
def _llm(name: str, dtype: torch.dtype = torch.float64) -> LLM:
    return LLM.from_model(build_model(presets.from_name(name).config, dtype=dtype).init_random_(3).eval())


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("plen, steps_per_block", [(5, 8), (11, 2), (16, 1)])
def test_llada2_block_cache_equals_recomputing_every_block(plen, steps_per_block):
    """The exact cache of finished blocks: tokens (and forwards) equal the loop that recomputes blocks < b."""
    llm = _llm("llada2-tiny")
    b, gen = L2.block_size, 16
    prompt = _prompt(plen, plen)
    want, nfe = sdar_generate(llm.model, prompt, gen_length=gen, block_length=b, steps_per_block=steps_per_block,
                              mask_id=L2.mask_token_id)
    out = llm.generate([prompt], SamplingParams(gen_length=gen, block_length=b, steps=steps_per_block * gen // b))[0]
    assert out.token_ids == want and out.nfe == nfe


@pytest.mark.parametrize("name, cache", [("llada-moe-tiny", "none"), ("llada-moe-tiny", "prefix"),
                                         ("llada-moe-tiny", "dual"), ("llada2-tiny", "none")])
def test_every_cache_mode_and_policy_runs(name, cache):
    llm = _llm(name)
    b = llm.model.config.block_size or 8
    prompts = [_prompt(6, 1), _prompt(13, 2)]
    fixed = SamplingParams(gen_length=16, block_length=b, steps=16, cache=cache, seed=0)
    outs = {"fixed": llm.generate(prompts, fixed)}
    for policy, knob in (("threshold", {"threshold": 0.02}), ("eb", {"eb_gamma": 5.0})):
        params = SamplingParams(gen_length=16, block_length=b, cache=cache, seed=0, policy=policy, **knob)
        outs[policy] = llm.generate(prompts, params)
    for policy, done in outs.items():
        assert all(len(o.token_ids) == 16 and L2.mask_token_id not in o.token_ids for o in done), policy
    assert sum(o.nfe for o in outs["threshold"]) < sum(o.nfe for o in outs["fixed"])  # decodes wider
    if cache != "none":  # a cache refreshed at every step is the no-cache decode
        plain = llm.generate(prompts, SamplingParams(gen_length=16, block_length=b, steps=16, seed=0))
        again = llm.generate(prompts, SamplingParams(gen_length=16, block_length=b, steps=16, seed=0, cache=cache,
                                                     cache_refresh=1))
        assert [o.token_ids for o in again] == [o.token_ids for o in plain]
    assert llm.engine.kv_cache is None or llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


@pytest.mark.parametrize("name", ["llada-moe-tiny", "llada2-tiny"])
def test_batch_invariance(name):
    """fp32: a request's tokens alone equal its tokens in a mixed batch (routing never depends on the batch)."""
    llm = _llm(name, torch.float32)
    b = llm.model.config.block_size or 8
    prompts = [_prompt(n, 10 + n) for n in (1, 17, 5, 9)]
    params = [SamplingParams(gen_length=16, block_length=b, steps=8, temperature=0.8, seed=5),
              SamplingParams(gen_length=8, block_length=b, steps=8, seed=6, policy="threshold", threshold=0.02),
              SamplingParams(gen_length=16, block_length=b, steps=16, seed=7, cache="prefix" if b == 8 else "none"),
              SamplingParams(gen_length=8, block_length=b, seed=8, policy="eb", eb_gamma=2.0)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


def test_init_random_then_generate_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "llada2"
    assert main(["init-random", "--preset", "llada2-tiny", "--out", str(out), "--seed", "1"]) == 0
    assert "llada2-tiny" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt-ids", "65,66,67", "--json", "--gen-length", "16",
                 "--block-length", "8", "--steps", "8", "--seed", "2", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"]["arch"] == "llada2" and len(record["token_ids"]) == 16
    llm = LLM(out, device="cpu")
    assert llm.generation_defaults == presets.from_name("llada2-tiny").generation_defaults
