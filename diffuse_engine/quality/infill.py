"""How well a model fills in the middle, and how much the suffix helps.

- Text (``text-char``): windows of held-out prose cut into prefix | middle | suffix (token ids, so that a
  character is a token for the byte-level vocabulary). The middle is decoded twice from the same prefix with the same
  settings: with the suffix after the canvas (:meth:`LLM.infill`) and without it (a plain continuation of the same
  length). The score is the fraction of middle tokens equal to the held-out text (character accuracy).
- Tasks with one answer (``addition``): the answer with one digit hidden; the prefix is the prompt and the digits
  before it, the suffix the digits after it. Scored per hidden position, and against a plain continuation that
  decodes the same digit with the digits after it masked (the canvas then holds the rest of the answer).

Both are greedy (temperature 0) and deterministic.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ..entrypoints.llm import LLM
from ..sampling_params import SamplingParams
from .tasks import Task, TextCorpus


def text_windows(llm: LLM, corpus: TextCorpus, *, n: int, left: int, middle: int, right: int,
                 seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (prefix, middle, suffix) token-id windows at random offsets of the held-out text (``seed``)."""
    if min(left, middle, right) < 1 or n < 1:
        raise ValueError(f"n, left, middle and right must be >= 1; got {n}, {left}, {middle}, {right}.")
    ids = llm.encode(corpus.held_out_text())
    width = left + middle + right
    if len(ids) < width:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {width}.")
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(len(ids) - width + 1), n))
    return [(ids[s:s + left], ids[s + left:s + left + middle], ids[s + left + middle:s + width]) for s in starts]


def _accuracy(outs, truths: list[list[int]]) -> float:
    hits = sum(sum(a == b for a, b in zip(o.token_ids, t, strict=True)) for o, t in zip(outs, truths, strict=True))
    return hits / sum(len(t) for t in truths)


def evaluate_text_infill(llm: LLM, corpus: TextCorpus, *, n: int = 200, left: int = 48, middle: int = 16,
                         right: int = 48, steps: int | None = None, block_length: int | None = None,
                         cache: str = "none", seed: int = 0) -> dict[str, Any]:
    """Character accuracy of the middle of ``n`` held-out windows, with and without the suffix (see the module
    docstring); ``steps`` defaults to one token per step, ``block_length`` to the whole middle."""
    windows = text_windows(llm, corpus, n=n, left=left, middle=middle, right=right, seed=seed)
    params = SamplingParams(gen_length=middle, block_length=block_length or middle, steps=steps or middle,
                            temperature=0.0, cache=cache, seed=0)
    prefixes = [w[0] for w in windows]
    truths = [w[1] for w in windows]
    t0 = time.perf_counter()
    with_suffix = llm.generate(prefixes, params, suffix=[w[2] for w in windows])
    t1 = time.perf_counter()
    without = llm.generate(prefixes, params)
    t2 = time.perf_counter()
    acc_with, acc_without = _accuracy(with_suffix, truths), _accuracy(without, truths)
    return {"task": corpus.name, "n": n, "left": left, "middle": middle, "right": right, "steps": params.steps,
            "block_length": params.block_length, "cache": cache, "seed": seed,
            "accuracy_with_suffix": round(acc_with, 4), "accuracy_without_suffix": round(acc_without, 4),
            "gain": round(acc_with - acc_without, 4), "wall_s_with": round(t1 - t0, 3),
            "wall_s_without": round(t2 - t1, 3)}


def evaluate_digit_infill(llm: LLM, task: Task, *, n: int = 200, cache: str = "none") -> dict[str, Any]:
    """Accuracy of one hidden answer digit of ``task``'s first ``n`` test examples, at every answer position:
    infilled between the digits before and after it, and decoded by a plain continuation whose canvas is the rest of
    the answer (the digits after it masked, one token per step)."""
    examples = task.test_set(n)
    g = task.gen_length
    one = SamplingParams(gen_length=1, block_length=1, steps=1, temperature=0.0, cache=cache, seed=0)
    rest_params = {k: SamplingParams(gen_length=k, block_length=k, steps=k, temperature=0.0, cache=cache, seed=0)
                   for k in range(1, g + 1)}
    per_position, plain_position = [], []
    t0 = time.perf_counter()
    for i in range(g):
        prefixes = [llm.encode(ex.prompt + ex.answer[:i]) for ex in examples]
        suffixes = [llm.encode(ex.answer[i + 1:]) or None for ex in examples]
        truth = [llm.encode(ex.answer[i]) for ex in examples]
        filled = llm.generate(prefixes, one, suffix=suffixes)
        per_position.append(_accuracy(filled, truth))
        plain = llm.generate(prefixes, rest_params[g - i])
        plain_position.append(sum(o.token_ids[0] == t[0] for o, t in zip(plain, truth, strict=True)) / len(truth))
    wall = time.perf_counter() - t0
    return {"task": task.name, "n": len(examples), "cache": cache,
            "accuracy_with_suffix": round(sum(per_position) / g, 4),
            "accuracy_without_suffix": round(sum(plain_position) / g, 4),
            "per_position_with_suffix": [round(a, 4) for a in per_position],
            "per_position_without_suffix": [round(a, 4) for a in plain_position], "wall_s": round(wall, 3)}
