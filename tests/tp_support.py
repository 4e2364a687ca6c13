"""What the tensor-parallel test modules share: a one-process and a two-rank LLM of the same folder (fp64), the
check that two ranks decode one process's tokens for each cache and policy, and whether a worker process lives."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from diffuse_engine import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12] * 6]
# Thresholds that the tiny random models pass for several tokens per step (their tokens have low probability): with
# stricter ones, threshold and EB commit one token per step and decode as the fixed schedule does.
POLICIES = {"fixed": {}, "threshold": {"policy": "threshold", "threshold": 0.005},
            "eb": {"policy": "eb", "eb_gamma": 12.0}}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def one_and_two(folder) -> Iterator[tuple[LLM, LLM]]:
    """The folder on one process and on two ranks, fp64; on exit the ranks close and no worker may outlive them."""
    one = LLM(folder, device="cpu", dtype="float64")
    two = LLM(folder, device="cpu", dtype="float64", tensor_parallel_size=2)
    pids = two._runtime.alive_workers()
    assert pids, "no worker process started"
    try:
        yield one, two
    finally:
        two.close()
    assert not any(alive(p) for p in pids), "close() left a worker process behind"


def assert_same_tokens(one: LLM, two: LLM, caches, block: int, gen: int) -> None:
    """Every cache x policy (sampled at temperature 0.7, fixed steps = half the canvas), then greedy: identical tokens.
    The threshold and EB runs must commit several tokens in some step, or they would test nothing the fixed run
    does not."""
    for cache in caches:
        for name, knobs in POLICIES.items():
            p = SamplingParams(gen_length=gen, block_length=block, seed=3, temperature=0.7, cache=cache,
                               **({"steps": gen // 2} if name == "fixed" else knobs))
            a, b = one.generate(PROMPTS, p), two.generate(PROMPTS, p)
            assert [o.token_ids for o in a] == [o.token_ids for o in b], (cache, name)
            assert name == "fixed" or min(o.nfe for o in a) < gen, f"{name} committed one token per step"
    greedy = SamplingParams(gen_length=gen, block_length=block, steps=gen, remasking="low_confidence")
    assert [o.token_ids for o in one.generate(PROMPTS, greedy)] == [o.token_ids for o in two.generate(PROMPTS, greedy)]
