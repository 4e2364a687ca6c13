"""The GPU suite's pieces on the CPU: bench_engine's cache and CUDA-graph dimensions (steady-state steps against
their floors), the step counts they use (diffuse_engine/bench/common.py), the CSV merging that keeps the suite's
output folder small, the files ``bench gpu`` writes (and run.sh lists), and the summary on such a folder."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import pytest
from script_modules import ROOT, load_script

bench_engine = load_script("bench_engine", ROOT / "benchmarks" / "bench_engine.py")
from diffuse_engine.bench import common  # noqa: E402
from diffuse_engine.bench.suites import gpu  # noqa: E402
from diffuse_engine.bench.suites import gpu_summary as summary  # noqa: E402

profile_step = load_script("profile_step", ROOT / "benchmarks" / "gpu" / "profile_step.py")

ENGINE_COLUMNS = ("batch", "cache", "cuda_graphs", "step_ms", "floor_ms", "pct_of_floor")


@pytest.fixture(scope="module")
def steady_csv(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "engine.csv"
    bench_engine.main(["--quick", "--ceilings", "--timing", "steady", "--caches", "none,prefix,dual",
                       "--graphs", "on,off", "--batches", "1,2", "--warmup-steps", "3", "--timed-steps", "4",
                       "--out", str(out)])
    return out


def test_steady_rows_per_cache_and_graphs(steady_csv):
    rows = list(csv.DictReader(open(steady_csv)))
    header = next(csv.reader(open(steady_csv)))
    assert set(ENGINE_COLUMNS) <= set(header)
    # on the CPU, graphs "on" is skipped; "off" runs every cache at every batch
    assert sorted((r["cache"], int(r["batch"])) for r in rows) == sorted(
        (c, b) for c in ("none", "prefix", "dual") for b in (1, 2))
    assert {r["cuda_graphs"] for r in rows} == {"off"} and {r["timing"] for r in rows} == {"steady"}
    for r in rows:
        assert float(r["step_ms"]) > 0 and float(r["floor_ms"]) > 0 and float(r["pct_of_floor"]) > 0
        assert int(r["timed_steps"]) == 4 and int(r["warmup_steps"]) == 3
    # --quick: prompt 8, canvas 32, block 16: what each mode recomputes and reads in a steady first-block step
    counts = {r["cache"]: (float(r["query_tokens"]), float(r["context_tokens"])) for r in rows}
    assert counts == {"none": (40, 0), "prefix": (32, 8), "dual": (16, 24)}
    floors = {(r["cache"], int(r["batch"])): float(r["floor_ms"]) for r in rows}
    assert floors["dual", 2] < floors["prefix", 2] < floors["none", 2]


def test_generation_timing_still_compares_with_the_reference(tmp_path):
    rows = bench_engine.main(["--quick", "--ceilings", "--caches", "none,dual", "--out", str(tmp_path / "e.csv")])
    assert [(r["cache"], r["timing"], r["cuda_graphs"]) for r in rows] == [("none", "generation", "default"),
                                                                            ("dual", "generation", "default")]
    assert rows[0]["identical_tokens"] == "32/32" and rows[0]["nfe"] == 32
    assert all(r["pct_of_floor"] > 0 for r in rows)


def test_steady_window_must_fit_in_the_first_block(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_engine.main(["--quick", "--timing", "steady", "--warmup-steps", "10", "--timed-steps", "10",
                           "--out", str(tmp_path / "e.csv")])
    assert "must fit in the first block" in capsys.readouterr().out


def test_engine_config_runs_the_whole_batch_and_sets_graphs():
    cfg = common.engine_config(64, 320, "off")
    assert cfg.max_num_seqs == 64 and cfg.scheduling == "fcfs" and cfg.kv_cache_tokens >= 64 * 320
    assert getattr(cfg, "cuda_graphs", False) is False  # off: False, or the default config without the option
    from diffuse_engine.engine import EngineConfig

    @dataclasses.dataclass
    class WithGraphs(EngineConfig):
        cuda_graphs: bool | None = None

    assert common.graphs_option(WithGraphs)
    assert common.engine_config(1, 40, "on", WithGraphs).cuda_graphs is True
    assert common.engine_config(1, 40, "off", WithGraphs).cuda_graphs is False
    assert common.engine_config(1, 40, None, WithGraphs).cuda_graphs is None


def test_cache_step_tokens_and_cost():
    from diffuse_engine.presets import from_name

    assert common.cache_step_tokens("none", 64, 256, 32, 3, False) == (320, 0)
    assert common.cache_step_tokens("dual", 64, 256, 32, 0, True) == (320, 0)  # a block's first step
    assert common.cache_step_tokens("dual", 64, 256, 32, 3, False) == (32, 288)
    assert common.cache_step_tokens("dual", 64, 256, 32, 3, False, shift=1) == (33, 287)
    assert common.cache_step_tokens("prefix", 64, 256, 32, 0, False) == (256, 64)
    assert common.cache_step_tokens("prefix", 64, 256, 32, 3, False) == (160, 160)
    cfg = from_name("llada-8b").config
    full = common.step_cost(cfg, [320], 32, 2)
    assert common.step_cost(cfg, [320], 32, 2, [0]) == full
    dual = common.step_cost(cfg, [32], 32, 2, [288])
    kv = 2 * cfg.num_kv_heads * cfg.head_dim * cfg.num_layers * 288 * 2
    assert dual["bytes"] - full["bytes"] == kv == 288 * 2 ** 19  # 0.5 MiB per context token (DESIGN section 5)
    d, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    weights = d * cfg.num_heads * hd + 2 * d * cfg.num_kv_heads * hd + cfg.num_heads * hd * d \
        + 3 * d * cfg.intermediate_size
    assert dual["flops"] == 2 * weights * layers * 32 + layers * 4 * 32 * (288 + 32) * cfg.num_heads * hd \
        + 2 * d * cfg.vocab_size * 32
    memory, compute = common.roofline_seconds(dual, {"bandwidth_gbs": 4000.0, "peak_tflops": 800.0})
    assert memory == pytest.approx(dual["bytes"] / 4e12) and compute == pytest.approx(dual["flops"] / 8e14)


def test_append_csv_union_keeps_one_file(tmp_path):
    path = tmp_path / "kernels.csv"
    common.append_csv(path, [{"op": "full", "ms": 1.0, "ratio_vs_sdpa": 1.1}], union=True)
    common.append_csv(path, [{"op": "row_stats", "ms": 2.0, "baseline": "torch", "ratio": 3.0}], union=True)
    common.append_csv(path, [{"op": "full", "ms": 4.0, "ratio_vs_sdpa": 0.9}], union=True)
    assert [p.name for p in tmp_path.iterdir()] == ["kernels.csv"]
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["op", "ms", "ratio_vs_sdpa", "baseline", "ratio"]
    assert [(r["op"], r["ms"], r["ratio_vs_sdpa"], r["ratio"]) for r in rows] == [
        ("full", "1.0", "1.1", ""), ("row_stats", "2.0", "", "3.0"), ("full", "4.0", "0.9", "")]
    # without union, another schema goes to a new file (as before)
    common.append_csv(tmp_path / "other.csv", [{"a": 1}])
    common.append_csv(tmp_path / "other.csv", [{"b": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.csv", "other.1.csv", "other.csv"]


def suite_outputs(out: Path) -> set[str]:
    """The files the sub-steps of ``bench gpu`` write into ``out`` (summary.md and suite.log: the suite itself)."""
    names = {"summary.md", "suite.log"}
    for _name, _limit, command in gpu.steps(out):
        for i, arg in enumerate(command):
            if arg.startswith(str(out) + "/"):
                names.add(Path(arg).name)
            elif arg == str(out) and command[i - 1] == "--out" and "bench" in command:
                names.add(command[command.index("bench") + 1].replace("-", "_") + ".csv")
    return names


def test_gpu_suite_writes_at_most_eight_files(tmp_path):
    names = suite_outputs(tmp_path)
    assert names == set(gpu.FILES) and len(names) <= 8, sorted(names)
    assert {"profile.csv", "engine.csv", "kernels.csv", "suite.log", "summary.md"} <= names
    header = (ROOT / "benchmarks" / "gpu" / "run.sh").read_text()
    listed = re.search(r"Writes at most 8 files into OUT_DIR: ([^(]+)", header.replace("\n# ", " ")).group(1).split()
    assert set(listed) == names
    assert "bench gpu" in header and "--trace" not in header
    commands = [" ".join(c) for _n, _l, c in gpu.steps(tmp_path)]
    assert any("pytest -m gpu" in c for c in commands)
    assert any("profile step --preset llada-8b" in c and "--csv" in c for c in commands)


def test_summary_on_a_suite_folder(steady_csv, tmp_path, capsys):
    out = tmp_path / "suite"
    out.mkdir()
    (out / "engine.csv").write_bytes(steady_csv.read_bytes())
    profile_step.main(["--device", "cpu", "--preset", "llada-tiny", "--batches", "2", "--gen-length", "32",
                       "--block-length", "16", "--prompt-len", "8", "--steps", "1", "--out", str(out / "profile.csv")])
    common.append_csv(out / "kernels.csv", [{"op": "full", "shape": "S=64", "provider": "triton", "ms": 1.0,
                                             "tflops": 2.0, "gbps": "", "pct_floor": 50.0, "ratio_vs_sdpa": 1.5}],
                      union=True)
    common.append_csv(out / "kernels.csv", [{"op": "row_stats", "shape": "M=4", "provider": "cuda", "ms": 0.1,
                                             "gbps": 900.0, "tflops": "", "pct_floor": 40.0, "baseline": "torch",
                                             "ratio": 9.0}], union=True)
    before = {p.name for p in out.iterdir()}
    capsys.readouterr()
    text = summary.main(out)
    assert {p.name for p in out.iterdir()} - before == {"summary.md"}
    assert len(before | {"summary.md"}) <= 8
    assert "attn_full/triton" in text and "row_stats/cuda" in text
    assert "batch  cache   graphs" in text and "pct_of_floor" in text and "dual" in text
    assert "where a step's time goes" in text and "idle (host)" in text and "top kernel" in text
    assert capsys.readouterr().out.strip() == text.strip()
