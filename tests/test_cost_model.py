"""The roofline cost model of a denoising step: presets, monotonicity, the ridge, calibration and its cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffuse_engine.engine import calibration
from diffuse_engine.engine.cost_model import A100, CPU, H100, H200, PRESETS, CostModel, DeviceCeilings
from diffuse_engine.presets import from_name

LLADA_8B = from_name("llada-8b").config
SMALL = from_name("llada-small").config


def test_presets_are_sane():
    assert set(PRESETS) == {"H100", "H200", "A100", "CPU"}
    assert H200.bandwidth_gbs > H100.bandwidth_gbs > A100.bandwidth_gbs > CPU.bandwidth_gbs
    assert H100.peak_tflops > A100.peak_tflops > CPU.peak_tflops
    assert 250 < H100.ridge_flops_per_byte < 280  # 798 TFLOP/s over 3.0 TB/s
    assert 170 < H200.ridge_flops_per_byte < 200
    for p in PRESETS.values():
        assert p.step_overhead_s < 0.01 and 0 <= p.overlap <= 1
    assert CPU.row_padding == 16 and H100.row_padding == 1


def test_llada_8b_floor_matches_the_design_numbers():
    """DESIGN section 5: 14.99 GB of weights per step, 4.48 ms at the H100's measured 3.0 TB/s (one token)."""
    est = CostModel(LLADA_8B, H100, 2).predict([(1, 0, 1)])
    assert est.regime == "memory"
    assert est.bytes == pytest.approx(14.99e9, rel=0.01)
    assert est.memory_s == pytest.approx(5.0e-3, rel=0.01)
    assert est.seconds > est.memory_s  # plus the launch overhead
    big = CostModel(LLADA_8B, H100, 2).predict([(4096, 0, 32)])
    assert big.regime == "compute"
    assert big.flops == pytest.approx(2 * 7.5e9 * 4096, rel=0.08)  # ~2 * params per token, plus attention


@pytest.mark.parametrize("ceilings", [H100, CPU])
@pytest.mark.parametrize("config", [LLADA_8B, SMALL])
def test_predict_is_monotone(ceilings, config):
    model = CostModel(config, ceilings, 2 if ceilings is H100 else 4)
    by_batch = [model.predict([(32, 256, 16)] * b).seconds for b in (1, 2, 4, 8, 16, 32)]
    assert by_batch == sorted(set(by_batch))
    by_tokens = [model.predict([(q, 0, 1)]).seconds for q in (1, 8, 16, 17, 32, 64, 256, 1024)]
    assert by_tokens == sorted(by_tokens)
    by_context = [model.predict([(32, c, 8)]).seconds for c in (0, 64, 512, 4096)]
    assert by_context == sorted(set(by_context))
    by_rows = [model.predict([(64, 0, r)]).seconds for r in (0, 1, 16, 32, 64)]
    assert by_rows == sorted(by_rows)
    assert model.predict([(64, 0, 64)]).seconds < model.predict([(64, 0, 64)] * 2).seconds


@pytest.mark.parametrize("ceilings", [H100, H200, A100, CPU])
def test_regime_flips_at_the_ridge(ceilings):
    model = CostModel(LLADA_8B, ceilings, 2)
    ridge = model.ridge_tokens()
    assert math.isfinite(ridge) and ridge >= 2
    n = int(ridge)
    below, at = model.predict([(n - 1, 0, n - 1)]), model.predict([(n, 0, n)])
    assert below.regime == "memory" and below.intensity < ceilings.ridge_flops_per_byte
    assert at.regime == "compute" and at.intensity >= ceilings.ridge_flops_per_byte
    # In bf16, weights alone would put the ridge at peak / bandwidth tokens (2 FLOPs per 2-byte weight and
    # token); activation traffic only moves it up.
    assert ridge >= 0.95 * ceilings.ridge_flops_per_byte
    assert model.ridge_tokens(context_tokens=2048) >= 1


def test_ridge_orders_devices_and_reports_never():
    assert CostModel(LLADA_8B, H200, 2).ridge_tokens() < CostModel(LLADA_8B, H100, 2).ridge_tokens()
    slow_compute = DeviceCeilings("x", bandwidth_gbs=1e6, peak_tflops=1e-3, step_overhead_s=0.0)
    assert CostModel(SMALL, slow_compute, 4).ridge_tokens() == 1.0
    starved = DeviceCeilings("y", bandwidth_gbs=1.0, peak_tflops=1e6, step_overhead_s=0.0)
    assert CostModel(SMALL, starved, 4).ridge_tokens() == math.inf


def test_fused_head_and_overlap():
    unfused = CostModel(SMALL, CPU, 4).predict([(32, 0, 32)] * 4)
    fused = CostModel(SMALL, CPU, 4, fused_head=True).predict([(32, 0, 32)] * 4)
    assert fused.bytes < unfused.bytes and fused.seconds < unfused.seconds
    ideal = DeviceCeilings("a", bandwidth_gbs=10, peak_tflops=0.1, step_overhead_s=0.0, overlap=1.0)
    additive = DeviceCeilings("b", bandwidth_gbs=10, peak_tflops=0.1, step_overhead_s=0.0, overlap=0.0)
    assert ideal.kernel_seconds(1e9, 1e11) == pytest.approx(1.0)
    assert additive.kernel_seconds(1e9, 1e11) == pytest.approx(1.1)


def test_row_padding_counts_padded_rows_in_time_not_in_flops():
    model = CostModel(SMALL, CPU, 4)
    one, sixteen = model.predict([(1, 0, 1)]), model.predict([(16, 0, 16)])
    assert one.flops < sixteen.flops
    assert one.seconds == pytest.approx(sixteen.seconds, rel=0.05)


def test_calibrate_writes_and_reuses_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))
    first = calibration.calibrate("cpu", torch.float32)
    path = tmp_path / calibration.CACHE_FILE
    assert path.exists()
    stored = json.loads(path.read_text())
    key = calibration.device_key("cpu", torch.float32)
    assert key in stored and "float32" in key and torch.__version__ in key
    assert first.source == "calibrated" and first.name == key
    assert first.bandwidth_gbs > 0.1 and first.peak_tflops > 1e-3 and first.overlap == 0.0
    assert first.row_padding == 16 and first.alloc_write_gbs > 0

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached calibration must not measure again")

    monkeypatch.setattr(calibration, "median_seconds", no_measuring)
    assert calibration.calibrate("cpu", torch.float32) == first
    assert calibration.ceilings_for("cpu", torch.float32) == first
    assert calibration.ceilings_for("cpu", torch.float32, calibrate=False) is CPU
    # A corrupt cache file, or an entry that no longer fits the dataclass, is measured over, not trusted.
    monkeypatch.undo()
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))
    for bad in ("{not json", json.dumps({key: {"name": key, "bandwidth_gbs": -1}})):
        path.write_text(bad)
        again = calibration.calibrate("cpu", torch.float32)
        assert again.source == "calibrated" and json.loads(path.read_text())[key]["bandwidth_gbs"] > 0


def test_ceilings_json_round_trip():
    assert DeviceCeilings.from_json(json.loads(json.dumps(H100.to_json()))) == H100


@pytest.mark.parametrize("items", [
    [], "abc", [(0, 0, 0)], [(4, 0, 5)], [(4, -1, 2)], [(4.0, 0, 2)], [(4, 0)], [(True, 0, 0)], None,
])
def test_predict_rejects_bad_items(items):
    with pytest.raises(ValueError, match=r"\.$"):
        CostModel(SMALL, CPU, 4).predict(items)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        DeviceCeilings("x", bandwidth_gbs=0, peak_tflops=1, step_overhead_s=0)
    with pytest.raises(ValueError, match="step_overhead_s"):
        DeviceCeilings("x", bandwidth_gbs=1, peak_tflops=1, step_overhead_s=-1)
    with pytest.raises(ValueError, match="overlap"):
        DeviceCeilings("x", bandwidth_gbs=1, peak_tflops=1, step_overhead_s=0, overlap=2)
    with pytest.raises(ValueError, match="row_padding"):
        DeviceCeilings("x", bandwidth_gbs=1, peak_tflops=1, step_overhead_s=0, row_padding=0)
    with pytest.raises(ValueError, match="dtype_bytes"):
        CostModel(SMALL, CPU, 3)
    with pytest.raises(ValueError, match="ModelConfig"):
        CostModel("llada-small", CPU, 4)
    with pytest.raises(ValueError, match="DeviceCeilings"):
        CostModel(SMALL, "CPU", 4)
    with pytest.raises(ValueError, match="context_tokens"):
        CostModel(SMALL, CPU, 4).ridge_tokens(context_tokens=-1)
    with pytest.raises(ValueError, match="head_fraction"):
        CostModel(SMALL, CPU, 4).ridge_tokens(head_fraction=1.5)
    with pytest.raises(ValueError, match="floating-point"):
        calibration.calibrate("cpu", torch.int32)
    with pytest.raises(ValueError, match="no preset"):
        calibration.preset_for("meta")
    with pytest.raises(ValueError, match="only 'cpu' and CUDA"):
        calibration.calibrate("meta")


# ------------------------------------------------------------------------------------------ mixture of experts
MOE_MINI = from_name("llada2-mini").config


def test_expected_distinct_experts_matches_a_monte_carlo_count():
    """E (1 - (1 - k/E)^T): the distinct experts that T tokens reach, each picking k of E at random."""
    model = CostModel(MOE_MINI, H100, 2)
    e, k = MOE_MINI.num_experts, MOE_MINI.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 4, 32, 128, 512):
        counts = [len(set(torch.rand(tokens, e, generator=g).argsort(-1)[:, :k].reshape(-1).tolist()))
                  for _ in range(200)]
        assert model.expected_experts(tokens) == pytest.approx(sum(counts) / len(counts), rel=0.03)
    assert model.expected_experts(1) == k and model.expected_experts(10 ** 6) == pytest.approx(e)
    assert CostModel(LLADA_8B, H100, 2).expected_experts(64) == 0.0


def test_moe_step_reads_only_the_reached_experts_and_computes_k_per_token():
    model = CostModel(MOE_MINI, H100, 2)
    c = MOE_MINI
    routed = c.num_moe_layers * c.expert_parameters()
    one = model.predict([(1, 0, 0)])
    all_experts = model.predict([(4096, 0, 0)])
    assert one.bytes == pytest.approx(2 * (c.num_parameters() - 2 * c.vocab_size * c.hidden_size
                                           - routed * (c.num_experts - c.num_experts_per_tok)), rel=0.01)
    assert all_experts.bytes > 5 * one.bytes
    per_token = (model.predict([(1, 0, 0)] * 65).flops - one.flops) / 64  # 1-token sequences: no attention growth
    assert per_token == pytest.approx(2 * (c.active_parameters() - 2 * c.vocab_size * c.hidden_size), rel=0.1)


@pytest.mark.parametrize("ceilings", [H100, H200])
def test_moe_ridge_lies_right_of_a_dense_model_with_the_same_weights(ceilings):
    """Few experts per step are read at small batches, but every token computes only k of them: the step stays
    memory-bound to many more tokens than a dense model of the same total weights."""
    dense = MOE_MINI.replace(num_experts=None, num_experts_per_tok=None, moe_intermediate_size=None,
                             num_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1,
                             score_function="softmax", routed_scaling_factor=1.0, norm_topk_prob=False,
                             expert_bias=False, partial_rotary_factor=1.0, arch="sdar", block_size=4,
                             intermediate_size=1)
    width = 1 + (MOE_MINI.num_parameters() - dense.num_parameters()) // (3 * dense.hidden_size * dense.num_layers)
    dense = dense.replace(intermediate_size=width)  # the same total weights in plain SwiGLU layers
    assert dense.num_parameters() == pytest.approx(MOE_MINI.num_parameters(), rel=0.001)
    moe_ridge = CostModel(MOE_MINI, ceilings, 2).ridge_tokens()
    dense_ridge = CostModel(dense, ceilings, 2).ridge_tokens()
    assert moe_ridge > 4 * dense_ridge


def test_tensor_parallel_splits_the_experts_and_keeps_two_all_reduces_per_layer():
    """A rank of LLaDA2.0-flash over 8 GPUs streams an eighth of every matmul weight but the routers (replicated) and
    the key/value heads (4 heads: each replicated on 2 ranks); the collectives are those of a dense model."""
    c = from_name("llada2-flash").config
    one, eight = CostModel(c, H200, 2), CostModel(c, H200, 2, tensor_parallel=8)
    assert eight.expert_weights * 8 == one.expert_weights == c.expert_parameters()

    def weights(m: CostModel) -> int:
        return m.fixed_weights + m.moe_layers * c.num_experts * m.expert_weights

    routers = c.num_moe_layers * c.num_experts * c.hidden_size
    kv_copies = c.num_layers * 2 * c.hidden_size * (8 * eight.kv_width - c.num_kv_heads * c.head_dim)
    assert weights(eight) * 8 == weights(one) + 7 * routers + kv_copies
    step = eight.predict([(64, 0, 64)])
    link, hidden = eight.link, 64 * c.hidden_size * 2
    want = (2 * c.num_layers + 1) * link.all_reduce_seconds(hidden, 8) + link.all_reduce_seconds(64 * 64, 8)
    assert step.phases["comm"] == pytest.approx(want)
    assert step.phases["body"] < one.predict([(64, 0, 64)]).phases["body"] / 4


def test_calibration_runs_on_a_moe_preset(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))
    config = from_name("llada2-tiny").config
    got = calibration.calibrate("cpu", torch.float32, config=config)
    assert got.source == "calibrated" and got.name.endswith("|llada2 E8 k2")
    assert got.name in json.loads((tmp_path / calibration.CACHE_FILE).read_text())
    tiny = calibration.tiny_config(config, 2)
    assert (tiny.num_experts, tiny.num_experts_per_tok, tiny.first_k_dense_replace) == (8, 2, 0)
    assert CostModel(config, got, 4).predict([(8, 0, 8)]).seconds > 0


def test_tensor_parallel_counts_one_ranks_share_and_the_all_reduces():
    """At tp=2 a rank streams half the layer and head weights of llada-8b and does half the FLOPs; the step adds
    2 all-reduces per layer (and one after the embedding) of the hidden states over the link, plus the head's small
    gather."""
    from diffuse_engine.engine.ceilings import NVLINK, LinkCeilings

    cfg = from_name("llada-8b").config
    one = CostModel(cfg, H100, 2)
    two = CostModel(cfg, H100, 2, tensor_parallel=2)
    assert two.head_weights * 2 == one.head_weights
    assert two.fixed_weights * 2 == one.fixed_weights
    items = [(32, 256, 32)]
    e1, e2 = one.predict(items), two.predict(items)
    assert "comm" not in e1.phases and e2.flops == pytest.approx(e1.flops / 2, rel=1e-9)
    hidden = 32 * cfg.hidden_size * 2
    want = (2 * cfg.num_layers + 1) * NVLINK.all_reduce_seconds(hidden, 2) + NVLINK.all_reduce_seconds(32 * 64, 2)
    assert e2.phases["comm"] == pytest.approx(want, rel=1e-12)
    assert NVLINK.all_reduce_seconds(1e9, 2) == pytest.approx(NVLINK.latency_s + 1e9 / (NVLINK.bandwidth_gbs * 1e9))
    assert NVLINK.all_reduce_seconds(1e9, 1) == 0.0
    slow = CostModel(cfg, H100, 2, tensor_parallel=2, link=LinkCeilings("slow", 1.0, 1e-3))
    assert slow.predict(items).seconds > e2.seconds + 0.05  # 65 all-reduces of 256 KiB over 1 GB/s
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="tensor_parallel"):
            CostModel(cfg, H100, 2, tensor_parallel=bad)
    with pytest.raises(ValueError, match="link"):
        CostModel(cfg, H100, 2, tensor_parallel=2, link="nvlink")
    for bw, lat in ((0.0, 1e-6), (float("nan"), 1e-6), (1.0, -1.0)):
        with pytest.raises(ValueError, match="LinkCeilings"):
            LinkCeilings("x", bw, lat)


def test_routed_experts_run_at_their_own_row_count():
    """1024 tokens of llada2-mini reach nearly all 256 experts, about 32 (token, expert) rows each: the routed
    matmuls run at the rate of 32-row matmuls (half of H100's peak at its 32 half-rows), not at the rate of 1024."""
    cfg = from_name("llada2-mini").config
    cm = CostModel(cfg, H100, 2)
    est = cm.predict([(1024, 0, 32)])
    touched = cm.expected_experts(1024)
    rows = math.ceil(1024 * cfg.num_experts_per_tok / touched)
    assert 250 < touched <= 256 and rows == 33
    routed_flops = 2.0 * cm.moe_layers * cm.expert_weights * 1024 * cfg.num_experts_per_tok
    at_batch_rate = routed_flops / H100.matmul_rate(1024)
    assert est.phases["body"] > 1.5 * at_batch_rate
    assert est.phases["body"] >= routed_flops / H100.matmul_rate(rows)
