"""The cost-model validation and the serving benchmark run on the CPU in their --quick form and write their rows."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(out)),
           "DIFFUSE_CACHE_DIR": str(out / "cache"), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_cost_model_benchmark_quick(tmp_path):
    proc = _run("bench_cost_model.py", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "cost_model_cpu.csv")))
    assert len(rows) >= 8 and {r["case"] for r in rows} == {"block", "full"}
    for r in rows:
        measured, predicted = float(r["measured_ms"]), float(r["predicted_ms"])
        assert measured > 0 and predicted > 0
        assert float(r["ratio"]) == pytest.approx(predicted / measured, rel=1e-6)
        assert 0.2 < predicted / measured < 5  # a sanity band; the accuracy itself is the full run's result
        assert r["regime"] in ("memory", "compute") and r["commit"] and r["device"].startswith("cpu")
        assert r["within_25pct"] in ("True", "False")
    assert {int(r["context"]) for r in rows} >= {0, 64}
    assert (tmp_path / "cost_model_cpu.png").stat().st_size > 1000
    assert "within 25%" in proc.stdout


def test_serving_benchmark_quick(tmp_path):
    proc = _run("bench_serving.py", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "serving_cpu.csv")))
    assert [r["mode"] for r in rows] == ["continuous", "static"]
    for r in rows:
        assert int(r["requests"]) == 24 and float(r["tokens_per_s"]) > 0
        assert 0 < float(r["p50_s"]) <= float(r["p99_s"])
        assert float(r["mean_batch"]) >= 1 and int(r["steps"]) > 0
        assert float(r["accuracy"]) >= 0.5
        assert r["identical_outputs"] == "True"  # batch invariance: the mode does not change any request's tokens
    assert "continuous / static" in proc.stdout
