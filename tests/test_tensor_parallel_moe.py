"""Tensor parallelism of the mixture-of-experts families over two CPU processes (gloo): LLaDA-MoE and LLaDA2 sharded
over two ranks decode the same tokens as one process (fp64, every cache each family has, fixed / threshold / EB
policies), a rank loads only its slices (every expert's intermediate rows, LLaDA2's fused q | k | v rows) and never
reads a split tensor whole, and settings that do not divide the model are refused before anything starts."""

from __future__ import annotations

import copy

import pytest
import torch
from tp_support import assert_same_tokens, one_and_two

from diffuse_engine import LLM
from diffuse_engine import loader as loader_module
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.distributed import ShardPlan, check_tensor_parallel
from diffuse_engine.loader import load_model
from diffuse_engine.models import build_model
from diffuse_engine.models.moe import checkpoint_shapes
from diffuse_engine.presets import from_name

FAMILIES = {"llada_moe": ("llada-moe-tiny", 4, 8), "llada2": ("llada2-tiny", 8, 16)}  # preset, block, gen length
# LLaDA2 is a block-diffusion model: every request runs its exact block cache, whatever ``cache`` says.
CACHES = {"llada_moe": ("none", "prefix", "dual"), "llada2": ("none",)}
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-moe")
    return {fam: write_random_checkpoint(root / fam, preset, seed=1) for fam, (preset, _, _) in FAMILIES.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, folders):
    """(family, one-process LLM, two-rank LLM), both fp64."""
    with one_and_two(folders[request.param]) as (one, two):
        yield request.param, one, two


def test_tokens_equal_one_process_fp64(pair):
    fam, one, two = pair
    _, block, gen = FAMILIES[fam]
    assert_same_tokens(one, two, CACHES[fam], block, gen)


def test_hidden_states_equal_one_process(pair):
    """The sharded forward (split heads, split experts, one all-reduce per MoE layer) vs one process, in fp64."""
    from diffuse_engine.models import TokenLayout

    _, one, two = pair
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(0))
    layout = TokenLayout.packed([12])
    layout.block_size = one.model.config.block_size
    h1 = one.model.local_hidden_states(ids, torch.arange(12), layout)
    h2 = two.model.hidden_states(ids, torch.arange(12), layout)
    torch.testing.assert_close(h2, h1, rtol=0, atol=1e-12)


def test_rank_zero_holds_its_slices(pair):
    """Rank 0 (this process) holds every expert with half its intermediate rows, half the shared and dense MLP
    rows, its query and key/value heads (LLaDA2: its q | k | v rows of the fused projection), the router whole."""
    fam, one, two = pair
    c = one.model.config
    full, local = one.model.state_dict(), two.model.state_dict()
    moe = c.first_k_dense_replace
    mlp = f"model.layers.{moe}.mlp"
    e, i, d = c.num_experts, c.moe_intermediate_size, c.hidden_size
    assert local[f"{mlp}.experts.gate_proj"].shape == (e, i // 2, d)
    assert local[f"{mlp}.experts.down_proj"].shape == (e, d, i // 2)
    assert torch.equal(local[f"{mlp}.experts.up_proj"], full[f"{mlp}.experts.up_proj"][:, : i // 2])
    assert torch.equal(local[f"{mlp}.experts.down_proj"], full[f"{mlp}.experts.down_proj"][..., : i // 2])
    assert torch.equal(local[f"{mlp}.gate.weight"], full[f"{mlp}.gate.weight"])
    hd = c.head_dim
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    if fam == "llada2":
        qkv = full["model.layers.0.attention.query_key_value.weight"]
        want = torch.cat([qkv[: q // 2], qkv[q: q + kv // 2], qkv[q + kv: q + kv + kv // 2]])
        assert torch.equal(local["model.layers.0.attention.query_key_value.weight"], want)
        assert local["model.layers.0.mlp.gate_proj.weight"].shape == (c.intermediate_size // 2, d)  # dense layer
        assert local[f"{mlp}.shared_experts.down_proj.weight"].shape == (d, c.num_shared_experts * i // 2)
        assert local["model.layers.0.attention.dense.weight"].shape == (d, q // 2)
        assert local["model.layers.0.attention.query_layernorm.weight"].shape == (hd,)
    else:
        assert local["model.layers.0.self_attn.k_proj.weight"].shape == (kv // 2, d)
        assert local["model.layers.0.self_attn.o_proj.weight"].shape == (d, q // 2)
        assert local["model.layers.0.self_attn.q_norm.weight"].shape == (hd,)
    assert two.model.kv_heads() == c.num_kv_heads // 2


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_sharded_load_reads_only_slices(folders, fam, monkeypatch):
    """Rank 1's load in this process: each parameter is ShardPlan.take of the whole one, and no tensor that the
    plan splits is read whole (per-expert tensors are sliced before they are stacked)."""
    whole_reads = []

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.handle.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self.handle, attr)

    real_open = loader_module.safe_open
    monkeypatch.setattr(loader_module, "safe_open", lambda *a, **k: Recording(real_open(*a, **k)))
    full, config, _ = load_model(folders[fam], dtype=torch.float64)
    plan = ShardPlan(config, 1, 2)
    assert len(whole_reads) == len(checkpoint_shapes(full))  # the recording sees every read
    whole_reads.clear()
    sharded, _, _ = load_model(folders[fam], dtype=torch.float64, shard=plan)
    split = [n for n in whole_reads if plan.slice_of(n) is not None]
    assert not split, f"read whole although split: {split[:5]}"
    experts = [n for n in checkpoint_shapes(full) if ".experts." in n]
    assert experts and all(plan.slice_of(n) is not None for n in experts)
    local = sharded.state_dict()
    for name, tensor in full.state_dict().items():
        assert torch.equal(local[name], plan.take(name, tensor)), name


@pytest.mark.parametrize("preset", ["llada-moe-tiny", "llada2-tiny"])
def test_ranks_partial_mlps_sum_to_the_whole(preset):
    """In one process: each rank's routed plus shared (or dense) MLP output from its slices, summed over the ranks,
    is the whole layer's; with a shared expert and a dense first layer in both families (LLaDA-MoE's shared expert
    sits beside its mlp, LLaDA2's inside it)."""
    c = from_name(preset).config.replace(num_shared_experts=1, first_k_dense_replace=1)
    full = build_model(c, dtype=torch.float64).init_random_(2)
    ranks = []
    for rank in range(2):
        part = copy.deepcopy(full)
        ShardPlan(c, rank, 2).shard_module(part)
        ranks.append(part)

    def mlp(model, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = model.blocks()[layer]
        shared = getattr(block, "shared_expert", None)
        return block.mlp(x) + (shared(x) if shared is not None else 0)

    x = torch.randn(9, c.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for layer in range(c.num_layers):
        torch.testing.assert_close(mlp(ranks[0], layer, x) + mlp(ranks[1], layer, x), mlp(full, layer, x),
                                   rtol=0, atol=1e-12)
    assert ranks[1].blocks()[1].mlp.experts.gate_proj.shape == (c.num_experts, c.moe_intermediate_size // 2,
                                                                c.hidden_size)


def test_bad_settings_are_refused(folders):
    moe, l2 = from_name("llada-moe-tiny").config, from_name("llada2-tiny").config
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(folders["llada_moe"], device="cpu", tensor_parallel_size=3)
    cases = [(moe.replace(moe_intermediate_size=30), 4, "does not divide the experts' width moe_intermediate_size 30"),
             (l2.replace(intermediate_size=130), 4, "does not divide the MLP width 130"),
             (l2.replace(num_heads=6), 4, "does not divide the model's 6 attention heads")]
    for config, size, match in cases:
        with pytest.raises(ValueError, match=match):
            check_tensor_parallel(config, size)
    # Every layer of the tiny LLaDA-MoE is a MoE layer: its unused dense width does not have to divide.
    assert check_tensor_parallel(moe.replace(intermediate_size=130), 4) == 4
