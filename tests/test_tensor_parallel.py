"""Tensor parallelism over two CPU processes (gloo): a model sharded over two ranks decodes the same tokens as one
process (fp64, every family, cache and policy), its logits agree to fp32 tolerance in fp32, the vocabulary-parallel
head's statistics equal the single-device head's, the CLI and torchrun launches work, bad settings are refused
before anything starts, and a worker that dies or hangs fails the requests within a bounded time without leaving
processes behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from served import free_port
from tp_support import PROMPTS, alive, assert_same_tokens, one_and_two

from diffuse_engine import LLM, SamplingParams
from diffuse_engine.checkpoint import write_random_checkpoint
from diffuse_engine.engine import EngineConfig
from diffuse_engine.errors import TensorParallelError
from diffuse_engine.kernels.reference import row_stats_reference
from diffuse_engine.kernels.sample_torch import RowFlags, sample_rows
from diffuse_engine.ops import vocab_parallel as vp

FAMILIES = {"llada": ("llada-tiny", 4), "dream": ("dream-tiny", 4), "sdar": ("sdar-tiny", 4)}  # preset, block
CACHES = {"llada": ("none", "prefix", "dual"), "dream": ("none", "prefix", "dual"), "sdar": ("none",)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {fam: write_random_checkpoint(root / fam, preset, seed=1) for fam, (preset, _) in FAMILIES.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, folders):
    """(family, one-process LLM, two-rank LLM), both fp64."""
    with one_and_two(folders[request.param]) as (one, two):
        yield request.param, one, two


def test_tokens_equal_one_process_fp64(pair):
    fam, one, two = pair
    assert_same_tokens(one, two, CACHES[fam], FAMILIES[fam][1], 8)


def test_guidance_and_top_k_gather_the_logits(pair):
    """Guidance and top-k / top-p need whole logits rows: gathered from the slices, same tokens."""
    fam, one, two = pair
    if fam == "sdar":
        pytest.skip("classifier-free guidance is for the full-attention families")
    p = SamplingParams(gen_length=8, block_length=8, steps=8, seed=5, temperature=0.9, top_k=20, top_p=0.9,
                       cfg_scale=1.5)
    assert [o.token_ids for o in one.generate(PROMPTS, p)] == [o.token_ids for o in two.generate(PROMPTS, p)]


def test_vocab_parallel_head_equals_single_device_head(pair):
    """model.head_stats on two ranks (each its vocabulary slice, reduced) vs the single-device statistics of the
    whole logits, in fp64: identical tokens, scores to fp64 rounding; with Dream's eps as the unfused head."""
    fam, one, two = pair
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (12,))
    h1 = one.model.local_hidden_states(ids, torch.arange(12), _packed(12))
    h2 = two.model.hidden_states(ids, torch.arange(12), _packed(12))
    assert torch.allclose(h1, h2, rtol=0, atol=1e-12)
    rows = torch.tensor([0, 3, 4, 7, 11])
    m = rows.numel()
    temp = torch.tensor([0.0, 0.7, 1.0, 0.0, 2.0], dtype=torch.float64)
    seed, step, pos = torch.arange(m) * 977 + 5, torch.full((m,), 3), rows.clone()
    raw = torch.tensor([True, False, True, False, True])
    exclude = torch.tensor([[1, -1], [-1, -1], [200, 299], [-1, -1], [-1, 5]])
    logits = one.model.logits_at(h1, rows)
    ref = row_stats_reference(logits, torch.arange(m), temp, seed, step, pos, raw_confidence=raw, conf_exclude=exclude)
    got = two.model.head_stats(h2, rows, temp, seed, step, pos, raw_confidence=raw, conf_exclude=exclude)
    assert torch.equal(got["token"], ref["token"])
    for key in ("prob", "top1", "margin", "neg_entropy"):
        assert torch.allclose(got[key], ref[key], rtol=1e-12, atol=1e-13), key
    flags = RowFlags(True, True, False, True, False, False)
    unfused = sample_rows(logits, temp, seed, step, pos, flags, raw_confidence=raw, conf_exclude=exclude)
    got = two.model.head_stats(h2, rows, temp, seed, step, pos, raw_confidence=raw, conf_exclude=exclude,
                               entropy_eps=1e-10)
    assert torch.equal(got["token"], unfused["token"])
    assert torch.allclose(got["neg_entropy"], unfused["neg_entropy"], rtol=1e-12, atol=1e-13)
    assert torch.allclose(two.model.logits_at(h2, rows), logits, rtol=0, atol=1e-12)


def _packed(n: int):
    from diffuse_engine.models import TokenLayout

    return TokenLayout.packed([n])


def test_fp32_logits_within_fp32_tolerance(folders):
    one = LLM(folders["dream"], device="cpu", dtype="float32")
    threads = torch.get_num_threads()
    with LLM(folders["dream"], device="cpu", dtype="float32", tensor_parallel_size=2) as two:
        assert torch.get_num_threads() == max(1, min(threads, len(os.sched_getaffinity(0)) // 2))
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        a, b = one.model(ids, attention_mask=mask), two.model(ids, attention_mask=mask)
        assert a.shape == b.shape == (2, 8, 320)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
            two.model(torch.tensor([[5, 320]]))
        torch.testing.assert_close(two.model(ids, attention_mask=mask), a, rtol=1e-5, atol=1e-5)  # still in step
        assert two.engine.cost_model.tp == 2 and two.model.tp.link.source == "measured"
    assert torch.get_num_threads() == threads  # the caller's threads are given back


@pytest.mark.parametrize("slices", [1, 2, 3, 5])
def test_sliced_statistics_equal_the_reference(slices):
    """Without processes: the partial statistics of vocabulary slices, combined, equal the whole row's, with ties
    across slice boundaries going to the lowest id and invalid rows (NaN, +inf, all -inf) flagged."""
    torch.manual_seed(slices)
    m, v = 10, 23
    x = torch.randn(m, v, dtype=torch.float64) * 3
    x[1, 4] = x[1, 20] = 50.0  # a tie across slices
    x[2, 6] = float("-inf")
    x[3] = float("-inf")
    x[4, 9] = float("nan")
    x[5, 2] = float("inf")
    temp = torch.tensor([0, 0, 0.5, 0, 0, 0, 1.0, 0, 0.3, 0], dtype=torch.float64)
    seed, step, pos = torch.arange(m) + 11, torch.arange(m), torch.arange(m) * 3
    raw = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    exclude = torch.full((m, 2), -1)
    exclude[0, 0], exclude[8, 1] = 3, int(x[8].argmax())
    ref = row_stats_reference(x, torch.arange(m), temp, seed, step, pos, raw_confidence=raw, conf_exclude=exclude)
    out = vp.sliced_row_stats(x, slices, temp, seed, step, pos, raw_confidence=raw, conf_exclude=exclude)
    # the host flags the engine passes (nothing read from the tensors) give the same partials
    lo, hi = vp.split_columns(v, slices)[-1]
    kw = {"raw_confidence": raw, "conf_exclude": exclude}
    read, _ = vp.slice_partials(x[:, lo:hi], lo, temp, seed, step, pos, **kw)
    told, _ = vp.slice_partials(x[:, lo:hi], lo, temp, seed, step, pos, **kw, flags=(True, True, False, True))
    assert torch.equal(read.nan_to_num(), told.nan_to_num())
    assert torch.equal(out["invalid"], ref["invalid"]) and ref["invalid"][[3, 4, 5]].all()
    assert torch.equal(out["token"], ref["token"]) and out["token"][1] == 4
    for key in ("prob", "top1", "margin", "neg_entropy"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-12, atol=1e-14, equal_nan=True)


def test_split_columns_and_bad_settings(folders):
    assert vp.split_columns(10, 3) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="non-empty"):
        vp.split_columns(4, 5)
    folder = folders["llada"]
    for size, match in ((3, "does not divide the model's 4 attention heads"), (0, "positive integer"),
                        ("2", "positive integer"), (True, "positive integer")):
        with pytest.raises(ValueError, match=match):
            LLM(folder, device="cpu", tensor_parallel_size=size)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=f"needs 2 CUDA devices; this machine has {torch.cuda.device_count()}"):
            LLM(folder, device="cuda", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="distributed_init"):
        EngineConfig(tensor_parallel_size=2, distributed_init="mpi")
    with pytest.raises(ValueError, match="distributed_timeout_s"):
        EngineConfig(distributed_timeout_s=0)
    with pytest.raises(ValueError, match="tensor_parallel_size is 2 but the model is on one device"):
        LLM.from_model(LLM(folder, device="cpu").model, engine_config=EngineConfig(tensor_parallel_size=2))


def _generate_cli(folder, *extra: str, launcher: list[str] | None = None) -> dict:
    cmd = (launcher or [sys.executable, "-m"]) + ["diffuse_engine", "generate", "--model", str(folder),
                                                  "--prompt-ids", "5,6,7,8", "--dtype", "float64", "--json",
                                                  "--gen-length", "8", "--steps", "8", "--seed", "4",
                                                  "--temperature", "0.8", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _one_process(folder) -> list[int]:
    """What the CLI generate of :func:`_generate_cli` prints without tensor parallelism."""
    llm = LLM(folder, device="cpu", dtype="float64")
    p = llm.default_params(gen_length=8, steps=8, seed=4, temperature=0.8)
    return llm.generate([5, 6, 7, 8], p)[0].token_ids


def test_cli_generate_with_two_ranks_prints_the_same_tokens(folders):
    two = _generate_cli(folders["llada"], "--tensor-parallel-size", "2")
    assert two["token_ids"] == _one_process(folders["llada"]) and len(two["token_ids"]) == 8


def test_torchrun_launch(folders, tmp_path):
    """Every rank started by torchrun (distributed_init env): rank 0 prints, the other rank serves it and exits."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m"]
    two = _generate_cli(folders["dream"], "--tensor-parallel-size", "2", "--distributed-init", "env",
                        launcher=torchrun)
    assert two["token_ids"] == _one_process(folders["dream"])


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_failed_worker_fails_the_requests_in_bounded_time(folders, fault):
    llm = LLM(folders["llada"], device="cpu", tensor_parallel_size=2,
              engine_config=EngineConfig(distributed_timeout_s=5.0))
    try:
        p = SamplingParams(gen_length=8, steps=8, seed=1)
        assert len(llm.generate(PROMPTS, p)) == 3
        (pid,) = llm._runtime.alive_workers()
        os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        outs = llm.generate(PROMPTS, p)
        elapsed = time.monotonic() - t0
        assert elapsed < 30, f"the failure took {elapsed:.1f} s to surface"
        assert {o.finish_reason for o in outs} == {"error"}
        assert all("tensor-parallel" in o.error and "rank 1" in o.error for o in outs), outs[0].error
        if fault == "kill":
            assert "exited with code -9" in outs[0].error
        with pytest.raises(TensorParallelError, match="start a new one"):
            llm.engine.add_request([1, 2, 3], p)
    finally:
        pids = llm._runtime.alive_workers() if llm._runtime is not None else []
        llm.close()
    assert not any(alive(p) for p in pids)


def test_workers_die_with_their_parent(folders):
    """A worker does not outlive a SIGKILL of the process that started it (a clean exit stops it too: the engine
    registers its shutdown at exit, and the fixtures above check close())."""
    script = ("import time; from diffuse_engine import LLM\n"
              f"llm = LLM({str(folders['llada'])!r}, device='cpu', tensor_parallel_size=2)\n"
              "print(*llm._runtime.alive_workers(), flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and all(alive(p) for p in pids)
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a worker was left behind after its parent was killed"
