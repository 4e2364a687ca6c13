"""``diffuse-engine bench SUITE`` on the CPU: the engine suite through the command line writes its CSV into --out and
nothing into the checkout, its rows stamped; --compare prints ratios; the default folder is made under the current
folder; the other CPU suites' ``run`` with tiny settings; bad input (a CUDA-only suite, an unknown preset, a missing
--compare folder) exits 2 with a one-line error."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from diffuse_engine.bench import compare
from diffuse_engine.bench.suites import default_out, device_slug

ROOT = Path(__file__).resolve().parent.parent
STAMP = ("date", "commit", "device", "torch", "triton", "diffuse_engine", "command")
CACHE = tempfile.mkdtemp(prefix="diffuse-bench-cache-")  # never a folder inside the checkout
TINY = ["--batches", "1,2", "--gen-lengths", "16", "--block-length", "16", "--prompt-len", "4", "--no-plots"]


def _bench(cwd: Path, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DIFFUSE_CACHE_DIR": CACHE,
           "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "diffuse_engine", "bench", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, str, str]:
    out = tmp_path_factory.mktemp("bench") / "run1"
    before = _status()
    proc = _bench(ROOT, "engine", "--quick", "--out", str(out), *TINY)
    return out, proc, before, _status()


def test_engine_writes_into_out_and_not_into_the_checkout(engine_run):
    out, proc, before, after = engine_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert before == after
    rows = list(csv.DictReader(open(out / "engine.csv")))
    assert sorted(int(r["batch"]) for r in rows) == [1, 2]
    for r in rows:
        assert all(r[c] for c in STAMP) and "bench engine" in r["command"]
        assert float(r["step_ms"]) > 0 and float(r["memory_floor_ms"]) > 0 and float(r["compute_floor_ms"]) > 0
    assert rows[0]["identical_tokens"] == "16/16"  # the checkout's reference loop
    assert "engine: 2 rows" in proc.stdout


def test_compare_prints_ratios(engine_run, tmp_path):
    out, _proc, _before, _after = engine_run
    old = tmp_path / "old"
    old.mkdir()
    rows = list(csv.DictReader(open(out / "engine.csv")))
    for r in rows:
        r["step_ms"] = str(2 * float(r["step_ms"]))
    rows[0]["batch"] = "64"  # a row only in the old run
    with open(old / "engine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    matched, only = compare.compare_folders(out, old, {"engine.csv": (("batch", "cache"), "step_ms")})
    assert [m["new/old"] for m in matched] == [pytest.approx(0.5)]
    assert any("only in the new run: batch=1" in line for line in only)
    assert any("only in the old run: batch=64" in line for line in only)
    with pytest.raises(ValueError, match="none of this run's CSV"):
        compare.compare_folders(out, tmp_path, {"engine.csv": ((), "step_ms")})


def test_default_folder_under_cwd_and_compare_from_the_command_line(engine_run, tmp_path):
    out, _proc, _before, _after = engine_run
    proc = _bench(tmp_path, "engine", "--quick", "--batches", "1", "--gen-lengths", "16", "--block-length", "16",
                  "--prompt-len", "4", "--no-reference", "--no-plots", "--compare", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    made = [p.name for p in tmp_path.iterdir() if p.name.startswith("bench-")]
    assert made == [default_out("cpu").name]
    assert (tmp_path / made[0] / "engine.csv").is_file()
    assert "new/old" in proc.stdout and "only in the old run: " in proc.stdout


def test_default_out_names_the_date_and_the_device():
    import datetime as dt

    assert default_out("cpu", dt.date(2026, 11, 30)).name == "bench-2026-11-30-cpu"
    assert device_slug("cpu") == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["gpu"], "CUDA"),
    (["engine", "--preset", "no-such-preset"], "unknown preset"),
    (["engine", "--quick", "--compare", "/no/such/folder"], "no such folder"),
    (["quality", "--preset", "llada-tiny"], "trained task model"),
    (["engine", "--quick", "--tensor-parallel-size", "2"], "applies to the tensor-parallel suite"),
    (["tensor-parallel", "--quick", "--tensor-parallel-size", "1"], "at least 2"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, argv, message):
    proc = _bench(tmp_path, *argv, "--out", str(tmp_path / "o"), timeout=60)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def _args(**kw) -> argparse.Namespace:
    base = {"model": None, "preset": None, "device": "cpu", "dtype": None, "quick": True, "progress": False}
    return argparse.Namespace(**{**base, **kw})


def _stamped(rows: list[dict]) -> None:
    assert rows and all(all(r.get(c) not in (None, "") for c in STAMP) for r in rows)


def test_cache_suite(tmp_path):
    from diffuse_engine.bench.suites import cache

    rows = cache.run(_args(preset="llada-tiny", gen_lengths=[8], block_length=4, prompt_len=4, batches=[1]),
                     tmp_path)
    _stamped(rows)
    assert rows[0]["setting"] == "reference loop" and len(rows) == 7
    assert len(list(csv.DictReader(open(tmp_path / "cache.csv")))) == 7


def test_serving_suite(tmp_path):
    from diffuse_engine.bench.suites import serving

    opts = serving.settings(_args())
    opts.num_requests, opts.rate = 8, [400.0]
    rows = serving.measure_all(opts)
    _stamped(rows)
    assert [r["mode"] for r in rows] == ["continuous", "static"] and rows[0]["identical_outputs"]


def test_cost_model_suite_and_its_plots(tmp_path):
    from diffuse_engine.bench import plots
    from diffuse_engine.bench.suites import cost_model

    opts = cost_model.settings(_args())
    opts.batches, opts.blocks, opts.contexts, opts.full_batches, opts.reps = [1], [8], [0, 32], [1], 1
    rows, _ceilings = cost_model.measure_all(opts)
    _stamped(rows)
    assert {r["case"] for r in rows} == {"block", "full"}
    if plots.available():
        paths = plots.draw("cost-model", rows, tmp_path)
        assert {p.name for p in paths} == {"cost_model_context.png", "cost_model.png"}


def test_quality_suite(tmp_path):
    from diffuse_engine.bench.suites import quality

    opts = quality.settings(_args(model="addition"))
    assert opts.limit == 16 and opts.block_lengths == [6]
    rows = quality.run(_args(model="addition"), tmp_path)
    _stamped(rows)
    assert {r["policy"] for r in rows} == {"low_confidence", "threshold"}
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["nfe"]) > 0 for r in rows)


def test_roofline_plot(engine_run, tmp_path):
    from diffuse_engine.bench import plots

    if not plots.available():
        pytest.skip("matplotlib is not installed")
    out, _proc, _before, _after = engine_run
    rows = list(csv.DictReader(open(out / "engine.csv")))
    assert [p.name for p in plots.draw("engine", rows, tmp_path)] == ["engine_roofline.png"]
    assert plots.ridge_batch(2.0, 0.5) == 4.0


def test_engine_suite_runs_a_model_folder(tmp_path):
    """``--model`` benchmarks a checkpoint's own weights (here the shipped ``addition`` model); the rows name it."""
    proc = _bench(tmp_path, "engine", "--quick", "--model", "addition", "--batches", "1", "--gen-lengths", "16",
                  "--block-length", "16", "--prompt-len", "4", "--no-reference", "--no-plots", "--out",
                  str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = csv.DictReader(open(tmp_path / "out" / "engine.csv"))
    assert row["preset"] == "addition" and float(row["step_ms"]) > 0


def test_tensor_parallel_suite(tmp_path):
    """Two CPU ranks against one in the same run: a row per rank count, the ratio against one rank, the collective
    time and the measured link."""
    proc = _bench(tmp_path, "tensor-parallel", "--quick", "--device", "cpu", "--batches", "1", "--warmup-steps", "1",
                  "--timed-steps", "2", "--out", str(tmp_path / "o"), "--no-plots", timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "o" / "tensor_parallel.csv")))
    assert [r["tp"] for r in rows] == ["1", "2"] and rows[0]["vs_tp1"] == "1.0"
    two = rows[1]
    assert float(two["step_ms"]) > 0 and float(two["collective_ms"]) > 0 and 0 < float(two["collective_share"]) < 1
    assert float(two["link_gbs"]) > 0 and float(two["comm_model_ms"]) > 0
