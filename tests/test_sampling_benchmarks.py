"""The sampling benchmark scripts (thin entry points over ``diffuse-engine profile``) run on the CPU (torch path, C++
twin when built): checked rows with achieved rates, floors and ratios against their baselines."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["bench_sample.py", "bench_lm_head.py"])
def test_sampling_benchmark_runs_on_the_cpu(tmp_path, script):
    out = tmp_path / "sampling.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--device", "cpu", "--csv",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert rows and all(float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["pct_floor"]) > 0 for r in rows)
    assert all(r["correct"] == "True" and float(r["error"]) >= 0 for r in rows)
    baselines = [r for r in rows if r["provider"] in ("torch", "matmul+torch")]
    assert baselines and {r["baseline"] for r in rows} <= {"torch", "matmul+torch"}
    assert all(float(r["ratio"]) == 1.0 for r in baselines)
