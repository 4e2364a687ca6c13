"""``diffuse-engine profile OP`` on the CPU: a wrong variant is reported and not timed; every op runs on a tiny shape
with a correct reference; ``--json`` prints only rows; ``--csv`` / ``--compare`` mark changes beyond the noise; bad
shapes exit 2 with one line; ``profile step --trace`` writes a Chrome trace; the kernels suite writes kernels.csv."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffuse_engine.bench import profile
from diffuse_engine.bench.variants import Variant, spec
from diffuse_engine.entrypoints.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
TINY = {"attention": ["B=1,S=16,H=2,KV=1,D=16,block=8", "B=1,L=4,P=16,H=2,KV=2,D=16"], "row_stats": ["M=3,V=50"],
        "lm_head_stats": ["M=2,V=40,D=16"], "commit": ["B=2,R=8"], "noise": ["M=2,V=33,kind=uniform"],
        "moe": ["N=5,D=16,I=16,E=4,K=2"], "step": ["B=1,P=4,G=32,K=16"]}
KEYS = {"variant", "shape", "time_ms", "error", "correct", "op", "date", "commit", "device", "torch", "triton",
        "diffuse_engine", "command"}


def _args(op: str, shapes: list[str], **kw) -> argparse.Namespace:
    base = dict(op=op, shape=shapes, device="cpu", dtype=None, quick=True, variants=None, model=None, preset=None,
                progress=False, warmup=0, reps=1, json=False, csv=None, compare=None, trace=None, cache="dual",
                policy="threshold", threshold=0.9)
    return argparse.Namespace(**{**base, **kw})


def test_a_wrong_variant_is_reported_and_not_timed(monkeypatch):
    def off_by_one(batch):
        def fn():
            canvas, committed, counters = spec("commit").plain(batch)
            return canvas + 1, committed, counters
        return fn

    def noisy(case):
        return lambda: spec("noise").plain(case) + 1e-3

    monkeypatch.setitem(spec("commit").variants, "off-by-one", Variant("off-by-one", off_by_one))
    monkeypatch.setitem(spec("noise").variants, "noisy", Variant("noisy", noisy))
    rows = profile.op_rows("commit", _args("commit", TINY["commit"], variants="torch,off-by-one"))
    rows += profile.op_rows("noise", _args("noise", ["M=2,V=33,kind=gumbel"], variants="torch,noisy"))
    by = {r["variant"]: r for r in rows}
    for name in ("off-by-one", "noisy"):
        assert by[name]["correct"] is False and by[name]["time_ms"] is None and by[name]["status"].startswith("wrong")
    assert by["off-by-one"]["mismatches"] > 0 and by["noisy"]["error"] == pytest.approx(1e-3, rel=0.1)
    assert by["torch"]["correct"] is True and by["torch"]["time_ms"] > 0


def test_profile_commit_json_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffuse_engine", "profile", "commit", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert wall < 60, wall
    rows = json.loads(proc.stdout)
    assert rows and all(KEYS <= set(r) for r in rows)
    correct = {r["variant"] for r in rows if r["correct"] and r["time_ms"] > 0}
    assert {"torch", "c++"} <= correct
    assert all(r["status"].startswith("unavailable") for r in rows if r["variant"] == "triton")


@pytest.mark.parametrize("op", sorted(TINY))
def test_every_op_runs_on_a_tiny_shape(op, tmp_path):
    rows = profile.op_rows(op, _args(op, TINY[op]))
    assert rows
    for shape in {r["shape"] for r in rows}:
        mine = [r for r in rows if r["shape"] == shape]
        assert mine[0]["correct"] is True and mine[0]["time_ms"] > 0, mine[0]
        assert all(r["correct"] is not False for r in mine), [r for r in mine if r["correct"] is False]
        assert all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in mine)
    if os.environ.get("TRITON_INTERPRET") == "1" and op in ("attention", "row_stats", "lm_head_stats", "commit", "moe"):
        interpreted = [r for r in rows if r["variant"] in ("triton", "fused-triton")]
        assert interpreted and all(r["status"] == "ok" and r["note"] == "interpreter timing" for r in interpreted)


def test_csv_then_compare(tmp_path, capsys):
    out = tmp_path / "sub" / "old.csv"
    assert cli(["profile", "noise", "--device", "cpu", "--shape", "M=2,V=33,kind=uniform", "--csv", str(out),
                "--warmup", "0", "--reps", "3", "--no-progress"]) == 0
    old = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in old} == {"torch", "c++"}
    rows = [{**r, **{k: float(r[k]) for k in ("time_ms", "p20_ms", "p80_ms")}} for r in old]
    profile.compare(rows, out)
    assert all(r["change"] == "same" and r["vs_old"] == pytest.approx(1.0) for r in rows)
    doctored = tmp_path / "slow.csv"
    with doctored.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows({**r, **{k: float(r[k]) * 10 for k in ("time_ms", "p20_ms", "p80_ms")}} for r in old)
    profile.compare(rows, doctored)
    assert all(r["change"] == "faster" and r["vs_old"] == pytest.approx(10.0) for r in rows)
    capsys.readouterr()
    assert cli(["profile", "noise", "--device", "cpu", "--shape", "M=2,V=33,kind=uniform", "--compare",
                str(doctored), "--json", "--reps", "3", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(r["change"] in ("faster", "same", "slower") and r["vs_old"] > 0 for r in again if r["time_ms"])


@pytest.mark.parametrize("spec_text", ["B=x,R=8", "R=8", "B=2,Q=3", "B2"])
def test_bad_shape_exits_2_with_one_line(spec_text, capsys):
    assert cli(["profile", "commit", "--device", "cpu", "--shape", spec_text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffuse-engine: error: --shape") and "\n" not in err


def test_step_trace_writes_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "traces"
    assert cli(["profile", "step", "--device", "cpu", "--preset", "llada-tiny", "--shape", TINY["step"][0],
                "--trace", str(trace), "--reps", "2", "--no-progress"]) == 0
    files = list(trace.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["traceEvents"]
    out = capsys.readouterr().out
    assert "GEMM" in out and "idle (host)" in out and "eager" in out


def test_kernels_suite_writes_kernels_csv(tmp_path):
    from diffuse_engine.bench.suites import kernels

    args = argparse.Namespace(quick=True, device="cpu", dtype=None, preset="llada-tiny", model=None, progress=False,
                              reps=1, warmup=0, variants="torch,matmul+torch,c++,matmul+native,grouped")
    rows = kernels.run(args, tmp_path)
    written = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert len(written) == len(rows) and {r["op"] for r in written} == set(kernels.OPS)
    assert all(r["correct"] == "True" for r in written if r["time_ms"])


def test_step_breakdown_rows_feed_the_gpu_summary(tmp_path, capsys):
    """``profile step --breakdown --csv`` (what the GPU suite runs) adds per-category rows after the timing rows;
    the suite's summary reads them into its "where a step's time goes" table."""
    from diffuse_engine.bench.suites.gpu_summary import profile_lines, read_csv

    out = tmp_path / "profile.csv"
    assert cli(["profile", "step", "--device", "cpu", "--preset", "llada-tiny", "--shape", TINY["step"][0],
                "--breakdown", "--csv", str(out), "--reps", "2", "--no-progress"]) == 0
    assert "breakdown rows" in capsys.readouterr().out and not list(tmp_path.glob("*.json"))  # no trace kept
    rows = read_csv(out)
    timing = [r for r in rows if not r.get("kind")]
    kinds = {r["kind"] for r in rows if r.get("kind")}
    assert {r["variant"] for r in timing} == {"eager", "graphs"} and {"step", "category", "idle", "kernel"} <= kinds
    step = next(r for r in rows if r.get("kind") == "step")
    assert step["batch"] == "1" and float(step["step_ms"]) > 0 and step["step_ms_unprofiled"] == timing[0]["time_ms"]
    text = "\n".join(profile_lines(rows))
    assert "where a step's time goes (llada-tiny" in text and "GEMM" in text and "idle (host)" in text
