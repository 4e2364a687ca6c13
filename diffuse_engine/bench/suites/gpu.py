"""The GPU suite (shared/GPU.md), after install and build: the card's ceilings, the GPU tests, the kernel
benchmarks, where a step's time goes, the engine and cache benchmarks, and the summary, into one folder of at most
8 files: :data:`FILES`.

Each sub-step runs as a subprocess with its own time limit (the ``diffuse-engine`` command line where there is one,
so that each is also runnable by hand); its output goes to the terminal and to ``suite.log``. A sub-step that fails
or runs out of time is logged and the suite goes on; the exit status is then 1. The tests (``tests/``) and the noise
benchmark (``benchmarks/bench_noise.py``) need a checkout; elsewhere they are skipped with a logged reason. Without
a CUDA device the suite stops at once (exit status 2)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..common import ROOT, stamp
from . import cache as cache_suite
from . import engine as engine_suite
from .gpu_summary import main as write_summary
from .options import PartialFailure

FILES = ("suite.log", "ceilings.json", "gpu-tests.xml", "kernels.csv", "profile.csv", "engine.csv", "cache.csv",
         "summary.md")
COLUMNS = ["step", "status", "seconds", "limit_s"]
KEYS = {**engine_suite.KEYS, **cache_suite.KEYS, "kernels.csv": (None, None)}
LLADA_8B = ["--preset", "llada-8b", "--device", "cuda", "--dtype", "bfloat16"]
SHAPE = ["--prompt-len", "64", "--gen-lengths", "256", "--block-length", "32"]


def steps(out: Path) -> list[tuple[str, int, list[str]]]:
    """(name, time limit in seconds, command) of each sub-step, in order."""
    py, bench = sys.executable, [sys.executable, "-m", "diffuse_engine", "bench"]
    todo = [("ceilings", 60, [py, "-m", "diffuse_engine.bench.ceilings", "--device", "cuda",
                              "--out", str(out / "ceilings.json")])]
    if (ROOT / "tests").is_dir():
        todo.append(("gpu tests", 240, [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests",
                                        "--junitxml", str(out / "gpu-tests.xml")]))
    if (ROOT / "benchmarks" / "bench_noise.py").is_file():
        todo.append(("noise", 90, [py, "benchmarks/bench_noise.py", "--no-csv"]))
    todo += [
        ("kernels", 390, [*bench, "kernels", "--device", "cuda", "--out", str(out), "--no-plots"]),
        ("profile", 120, [py, "-m", "diffuse_engine", "profile", "step", *LLADA_8B, "--shape", "B=1,P=64,G=256,K=32",
                          "--shape", "B=32,P=64,G=256,K=32", "--cache", "dual", "--policy", "threshold",
                          "--threshold", "0.9", "--breakdown", "--csv", str(out / "profile.csv")]),
        ("engine generations", 120, [*bench, "engine", *LLADA_8B, *SHAPE, "--batches", "1", "--tokens-per-step",
                                     "1,2,4,8", "--caches", "none", "--reference", "--out", str(out), "--no-plots"]),
        ("engine steady", 240, [*bench, "engine", *LLADA_8B, *SHAPE, "--batches", "1,8,32,64", "--tokens-per-step",
                                "1", "--timing", "steady", "--warmup-steps", "3", "--timed-steps", "6", "--caches",
                                "none,prefix,dual", "--graphs", "on,off", "--no-reference", "--out", str(out),
                                "--no-plots"]),
        ("cache", 150, [*bench, "cache", *LLADA_8B, *SHAPE, "--batches", "1", "--out", str(out), "--no-plots"]),
    ]
    return todo


class Log:
    """Lines to the terminal and to ``suite.log``."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")

    def close(self) -> None:
        self.file.close()


def run_step(command: list[str], limit: float, log: Log) -> int:
    """Run ``command`` (its output logged line by line) for at most ``limit`` seconds; its exit status, 124 when
    it ran out of time (its process group is then terminated)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    log("+ " + " ".join(command))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT if (ROOT / "diffuse_engine").is_dir() else None, start_new_session=True)
    reader = threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        status = 124
    reader.join(timeout=5)
    return status


def run(args: argparse.Namespace, out: Path) -> list[dict]:
    """``diffuse-engine bench gpu``: every sub-step into ``out``; :class:`PartialFailure` when some failed."""
    if not torch.cuda.is_available():
        raise ValueError(f"the GPU suite needs a CUDA device; torch {torch.__version__} sees none on this machine.")
    if args.device and torch.device(args.device).type != "cuda":
        raise ValueError(f"the GPU suite runs on CUDA; got --device {args.device}.")
    log = Log(out / "suite.log")
    start, rows, base = time.perf_counter(), [], stamp("cuda")
    log(f"# suite start {base['date']} on {base['device']}, commit {base['commit']}")
    if not (ROOT / "tests").is_dir():
        log(f"# gpu tests: skipped, no tests/ folder next to the package ({ROOT})")
    try:
        for name, limit, command in steps(out):
            t0 = time.perf_counter()
            status = run_step(command, limit, log)
            seconds = time.perf_counter() - t0
            if status:
                log(f"FAILED ({status}{', out of time' if status == 124 else ''}): {name}")
            log(f"# {name} done: {time.perf_counter() - start:.0f} s")
            rows.append({**base, "step": name, "status": "ok" if status == 0 else f"failed ({status})",
                         "seconds": round(seconds, 1), "limit_s": limit})
        try:
            text = write_summary(out)  # printed by it; into the log here
            with log.lock:
                log.file.write(text + "\n")
        except Exception as exc:  # noqa: BLE001 - a broken file must not hide the others
            log(f"FAILED: summary: {type(exc).__name__}: {exc}")
            rows.append({**base, "step": "summary", "status": "failed", "seconds": 0, "limit_s": ""})
        failed = [r["step"] for r in rows if r["status"] != "ok"]
        log(f"# suite end after {time.perf_counter() - start:.0f} s, {len(failed)} failed sub-step(s)")
    finally:
        log.close()
    if failed:
        raise PartialFailure(f"{len(failed)} sub-step(s) failed: {', '.join(failed)}", rows)
    return rows
