"""diffuse_engine.bench.step_profile (behind benchmarks/gpu/profile_step.py): the categoriser on kernel (CUDA) and
aten op (CPU) names, the breakdown of a CUDA-style trace, and a whole CPU run on tiny presets whose CSV adds up."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from diffuse_engine.bench import step_profile as ps

NAMES = [
    # cuBLAS / cuBLASLt / CUTLASS GEMMs (Hopper and Ampere names)
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "GEMM"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "GEMM"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "GEMM"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>", "GEMM"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "GEMM"),
    # attention: flash / memory-efficient / cuDNN SDPA, ours (Triton), before the cutlass rule
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>)",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("_block_attn_cached_kernel", "attention"),
    ("_combine_splits_kernel", "attention"),
    ("_attention_kernel", "attention"),
    # head and statistics
    ("_lm_head_stats_kernel", "head"),
    ("_merge_kernel", "head"),
    ("void (anonymous namespace)::row_stats_kernel<(Dtype)1>(RowStatsArgs)", "head"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, SoftMaxForwardEpilogue>",
     "head"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, int, long>>",
     "head"),
    ("counter_noise_kernel", "head"),
    # commit
    ("void (anonymous namespace)::commit_kernel(CommitArgs)", "commit"),
    ("_commit_kernel", "commit"),
    # norms, RoPE, elementwise
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "norms/elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<OpaqueType<2u>, unsigned int, 3, 128, 1>",
     "norms/elementwise"),
    ("void at::native::index_elementwise_kernel<128, 4, gpu_index_kernel>", "norms/elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "norms/elementwise"),
    ("triton_poi_fused_add_mul_0", "norms/elementwise"),
    # copies between host and device, unmatched names
    ("Memcpy HtoD (Pageable -> Device)", "other"),
    ("Memset (Device)", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, func_wrapper_t<float, sum_functor>>>",
     "other"),
    # aten op names (the CPU profile)
    ("aten::linear", "GEMM"), ("aten::addmm", "GEMM"), ("aten::mm", "GEMM"), ("aten::bmm", "GEMM"),
    ("aten::matmul", "GEMM"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::softmax", "head"), ("aten::_softmax", "head"), ("aten::argmax", "head"), ("aten::topk", "head"),
    ("aten::rms_norm", "norms/elementwise"), ("aten::add", "norms/elementwise"), ("aten::mul", "norms/elementwise"),
    ("aten::cat", "norms/elementwise"), ("aten::index", "norms/elementwise"), ("aten::copy_", "norms/elementwise"),
    ("aten::embedding", "norms/elementwise"), ("aten::to", "norms/elementwise"),
    ("aten::sum", "other"), ("aten::nonzero", "other"), ("aten::empty", "other"), ("aten::item", "other"),
]


@pytest.mark.parametrize("name,category", NAMES)
def test_categorize(name, category):
    assert ps.categorize(name) == category


def test_every_rule_names_a_category():
    assert {c for c, _ in ps.RULES} <= set(ps.CATEGORIES)


def _x(cat: str, name: str, ts: float, dur: float, pid: int = 0, tid: int = 7) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_breakdown_of_a_cuda_trace():
    """Kernels on the device timeline: busy union, categories, idle before / between / after, the span extended
    to a kernel that ends after the step's CPU range, graph launches, and a step left out by ``keep``."""
    events = [
        _x("user_annotation", "engine.step", 1000, 500, 1, 1),
        _x("cpu_op", "aten::linear", 1010, 50, 1, 1),  # ignored: the trace has device events
        _x("cuda_runtime", "cudaGraphLaunch", 1050, 5, 1, 1),
        _x("kernel", "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", 1100, 100),
        _x("kernel", "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>", 1200, 5),
        _x("kernel", "_block_attn_cached_kernel", 1210, 50),
        _x("kernel", "_lm_head_stats_kernel", 1270, 30),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 1305, 5),
        _x("kernel", "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", 1450, 100),  # ends at 1550, after the range
        _x("user_annotation", "engine.step", 2000, 400, 1, 1),
        _x("kernel", "_commit_kernel", 2100, 10),
    ]
    b = ps.breakdown({"traceEvents": events}, keep=[0])
    assert b["source"] == "cuda kernels" and b["steps"] == 1
    assert b["span_us"] == pytest.approx(550)
    busy = 100 + 5 + 50 + 30 + 5 + 100
    assert b["idle_us"] == pytest.approx(550 - busy)
    parts = b["idle_parts_us"]
    assert parts["before first kernel"] == pytest.approx(100)
    assert parts["after last kernel"] == pytest.approx(0)
    assert parts["between kernels"] == pytest.approx(450 - busy)
    assert b["categories_us"] == pytest.approx({"GEMM": 200, "attention": 50, "head": 30, "commit": 0,
                                                "norms/elementwise": 5, "other": 5})
    assert b["kernels_us"]["nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT"] == (2, pytest.approx(200))
    assert b["graph_launches"] == 1
    both = ps.breakdown({"traceEvents": events})
    assert both["steps"] == 2 and both["categories_us"]["commit"] == pytest.approx(5)
    rows = ps.breakdown_rows(b, top=3)
    kernels = [r for r in rows if r["kind"] == "kernel"]
    assert [r["name"] for r in kernels][0].startswith("nvjet") and len(kernels) == 3
    assert sum(r["ms"] for r in rows if r["kind"] in ("category", "idle")) == pytest.approx(0.55, abs=1e-3)


def test_cpu_ops_top_level_only():
    events = [_x("user_annotation", "engine.step", 0, 100, 1, 1), _x("cpu_op", "aten::linear", 10, 40, 1, 1),
              _x("cpu_op", "aten::addmm", 12, 30, 1, 1), _x("cpu_op", "aten::add", 60, 10, 1, 1)]
    b = ps.breakdown({"traceEvents": events})
    assert b["source"] == "cpu ops"
    assert b["categories_us"]["GEMM"] == pytest.approx(40) and b["categories_us"]["norms/elementwise"] == 10
    assert b["idle_us"] == pytest.approx(50)


def _check_profile_csv(path: Path, batches: list[int]) -> None:
    rows = list(csv.DictReader(open(path)))
    assert {int(r["batch"]) for r in rows} == set(batches)
    for batch in batches:
        mine = [r for r in rows if int(r["batch"]) == batch]
        kinds = [r["kind"] for r in mine]
        assert kinds.count("step") == 1 and kinds.count("idle") == 1 and kinds.count("idle_part") == 3
        assert 1 <= kinds.count("kernel") <= 15
        assert [r["name"] for r in mine if r["kind"] == "category"] == list(ps.CATEGORIES)
        assert all(float(r["ms"]) >= 0 and 0 <= float(r["pct_of_step"]) <= 100 + 1e-6 for r in mine)
        step = float(next(r["ms"] for r in mine if r["kind"] == "step"))
        categories = sum(float(r["ms"]) for r in mine if r["kind"] == "category")
        idle = float(next(r["ms"] for r in mine if r["kind"] == "idle"))
        parts = sum(float(r["ms"]) for r in mine if r["kind"] == "idle_part")
        assert step > 0 and float(mine[0]["step_ms"]) == pytest.approx(step, abs=1e-3)
        assert categories + idle <= step + 1e-3 and categories + idle >= 0.98 * step - 1e-3
        assert parts == pytest.approx(idle, abs=1e-3)
        assert float(next(r["ms"] for r in mine if r["name"] == "GEMM")) > 0
        tops = [float(r["ms"]) for r in mine if r["kind"] == "kernel"]
        assert tops == sorted(tops, reverse=True)
        assert all(r["source"] == "cpu ops" and r["cache"] == "dual" and r["policy"] == "threshold" for r in mine)


@pytest.mark.parametrize("preset,batches", [("llada-tiny", [1, 3]), ("dream-tiny", [2])])
def test_profile_step_runs_on_the_cpu(tmp_path, preset, batches):
    out = tmp_path / "profile.csv"
    rows = ps.main(["--device", "cpu", "--preset", preset, "--batches", ",".join(map(str, batches)),
                    "--gen-length", "64", "--block-length", "16", "--prompt-len", "8",
                    "--trace", str(tmp_path / "traces"), "--out", str(out)])
    assert rows
    _check_profile_csv(out, batches)
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == [f"profile_b{b}.json" for b in batches]
