"""Quality and speed of a model on a task: exact-match accuracy, NFE, tokens per forward, tokens/s, and for the
text corpus the held-out bits per character (LLaDA's ELBO bound).

Token counts are output tokens only (the ``gen_length`` canvas of each request, EOS padding included, never the
prompt); ``tokens_per_forward`` = canvas tokens / NFE; ``tokens_per_s`` = canvas tokens of the whole run / its
wall time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..entrypoints.llm import LLM
from ..models import DiffusionLM
from ..sampling_params import REMASKING, SamplingParams
from ..tokenizer import Tokenizer
from .likelihood import masked_nll
from .tasks import Task, TextCorpus

# progress(done, total): called as examples (or ELBO windows) finish.
ProgressFn = Callable[[int, int], None]

# Decoding settings the evaluation knows, by name -> SamplingParams fields: every confidence ordering with fixed
# steps, the adaptive policies, and fixed steps with each revision policy. The sweep covers all of them by
# default (see KNOBS for the adaptive ones).
POLICIES: dict[str, dict[str, Any]] = {name: {"remasking": name} for name in REMASKING}
POLICIES.update({
    "threshold": {"policy": "threshold"},
    "factor": {"policy": "factor"},
    "eb": {"policy": "eb"},
    "remdm-cap": {"revision": "remdm", "remdm_variant": "cap", "remdm_eta": 0.1},
    "remdm-rescale": {"revision": "remdm", "remdm_variant": "rescale", "remdm_eta": 0.1},
    "remdm-conf": {"revision": "remdm", "remdm_variant": "conf", "remdm_eta": 0.1},
    "wino": {"policy": "threshold", "revision": "wino", "verify_threshold": 0.9},
    "edit": {"revision": "edit", "edit_margin": 0.2},
})
# Adaptive policies take as many steps as their confidence rule needs: the sweep varies this parameter instead
# of ``steps`` (name -> (SamplingParams field, values from fast to careful)).
KNOBS: dict[str, tuple[str, tuple[float, ...]]] = {
    "threshold": ("threshold", (0.3, 0.5, 0.7, 0.9, 0.99)),
    "factor": ("factor", (4.0, 2.0, 1.0, 0.5, 0.1)),
    "eb": ("eb_gamma", (3.0, 1.0, 0.1, 0.01, 0.001)),
    "wino": ("threshold", (0.3, 0.5, 0.7, 0.9)),
}


def policy_params(policy: str, *, gen_length: int, block_length: int, steps: int, seed: int = 0,
                  **extra: Any) -> SamplingParams:
    """SamplingParams of ``policy`` (a key of :data:`POLICIES`) for one evaluation setting (greedy tokens)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; available: {', '.join(POLICIES)}.")
    fields = {"gen_length": gen_length, "block_length": block_length, "steps": steps, "temperature": 0.0,
              "seed": seed, **POLICIES[policy], **extra}  # extra may set temperature
    return SamplingParams(**fields)


@dataclass
class EvalResult:
    """One evaluation run of a task: accuracy over ``n`` held-out examples and what it cost."""

    task: str
    policy: str
    gen_length: int
    block_length: int
    steps: int
    n: int
    correct: int
    accuracy: float
    nfe: float  # mean forward evaluations per request
    tokens_per_forward: float
    tokens_per_s: float
    wall_s: float
    failures: list[dict[str, str]]

    def as_dict(self, *, with_failures: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_failures:
            d.pop("failures")
        return d


def evaluate_task(llm: LLM, task: Task, policy: str = "low_confidence", *, steps: int | None = None,
                  block_length: int | None = None, limit: int | None = None, examples=None,
                  max_failures: int = 5, progress: ProgressFn | None = None, **params: Any) -> EvalResult:
    """Generate the answers of ``task``'s test set (its first ``limit`` examples, or ``examples``) in one
    batch run and check them. ``steps`` defaults to one token per step; ``block_length`` to the task's.
    ``progress(done, total)`` is called whenever requests finish."""
    if isinstance(task, TextCorpus):
        raise ValueError(f"{task.name!r} is a text corpus, not a task with a checker: use evaluate_text.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    g = task.gen_length
    block_length = block_length or task.block_length
    steps = steps or g
    sp = policy_params(policy, gen_length=g, block_length=block_length, steps=steps, **params)
    data = list(examples) if examples is not None else task.test_set(limit)
    on_step = None
    if progress is not None:
        done = [0]

        def on_step(step) -> None:
            finished = sum(1 for out in step if out.finished)
            if finished:
                done[0] += finished
                progress(done[0], len(data))

    t0 = time.perf_counter()
    outs = llm.generate([ex.prompt for ex in data], sp, on_step=on_step)
    wall = time.perf_counter() - t0
    correct, failures = 0, []
    for ex, out in zip(data, outs, strict=True):
        if task.check(ex.prompt, out.text or ""):
            correct += 1
        elif len(failures) < max_failures:
            failures.append({"prompt": ex.prompt, "expected": ex.answer, "output": out.text or ""})
    nfe = sum(o.nfe for o in outs)
    tokens = sum(len(o.token_ids) for o in outs)
    return EvalResult(task.name, policy, g, block_length, steps, len(data), correct, correct / len(data),
                      nfe / len(data), tokens / nfe if nfe else 0.0, tokens / wall if wall > 0 else 0.0, wall,
                      failures)


@torch.no_grad()
def elbo_bits(model: DiffusionLM, tokenizer: Tokenizer, text: str, *, seq_len: int = 128, samples: int = 8,
              seed: int = 0, max_windows: int | None = None, batch_size: int = 64,
              progress: ProgressFn | None = None) -> dict[str, float]:
    """Held-out bits per byte and per character of ``text`` under the model: the ELBO bound of masked
    diffusion estimated by Monte Carlo (LLaDA's estimator: l ~ U{1..L} positions masked uniformly, the masked
    cross-entropy weighted by L / l), over consecutive ``seq_len``-token windows, ``samples`` draws each (a
    shifted-logit model reads row i - 1: :func:`.likelihood.masked_nll`)."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seq_len}.")
    windows = ids[:n_windows * seq_len].view(n_windows, seq_len).repeat_interleave(samples, dim=0)
    gen = torch.Generator().manual_seed(seed)
    mask_id = model.config.mask_token_id
    total_nats = 0.0
    for start in range(0, windows.shape[0], batch_size):
        x = windows[start:start + batch_size]
        b = x.shape[0]
        num_masked = torch.randint(1, seq_len + 1, (b,), generator=gen)
        ranks = torch.rand(b, seq_len, generator=gen).argsort(dim=1).argsort(dim=1)
        masked = ranks < num_masked[:, None]
        noisy = torch.where(masked, torch.full_like(x, mask_id), x)
        ce = masked_nll(model, noisy, x, masked)
        per_row = torch.zeros(b, dtype=torch.float64).index_add_(0, masked.nonzero()[:, 0], ce)
        total_nats += float((per_row * seq_len / num_masked.double()).sum())
        if progress is not None:
            progress((start + b) // samples, n_windows)
    used = ids[:n_windows * seq_len]
    n_bytes = used.numel() * samples
    n_chars = len(tokenizer.decode(used.tolist())) * samples
    bits = total_nats / math.log(2)
    return {"bits_per_byte": bits / n_bytes, "bits_per_char": bits / n_chars, "windows": n_windows,
            "samples_per_window": samples}


def text_samples(llm: LLM, corpus: TextCorpus, *, n: int = 3, prompt_chars: int = 48, gen_length: int = 64,
                 block_length: int = 16, temperature: float = 0.8, policy: str = "low_confidence") -> list[dict]:
    """Continuations of ``n`` held-out passages: each prompt is the ``prompt_chars`` characters that follow the
    first sentence end a third of the way into a held-out topic; one token per step, request i seeded i."""
    prompts = []
    for name in corpus.held_out_topics()[:n]:
        body = corpus.topics[name]
        start = body.find(". ", len(body) // 3)
        start = start + 2 if start >= 0 else 0
        prompts.append(body[start:start + prompt_chars])
    params = [policy_params(policy, gen_length=gen_length, block_length=block_length, steps=gen_length, seed=i,
                            temperature=temperature) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    return [{"prompt": p, "output": o.text or "", "params": f"{policy}, T={temperature}, block {block_length}, "
             f"{gen_length} steps, seed {i}"} for i, (p, o) in enumerate(zip(prompts, outs, strict=True))]


# ---------------------------------------------------------------------------------------- training metrics
def validation_metric(model: DiffusionLM, tokenizer: Tokenizer, task: Task | TextCorpus,
                      limit: int) -> tuple[str, float]:
    """The number watched during training: validation accuracy at one token per step (tasks) or held-out bits
    per character on a few windows (text)."""
    if isinstance(task, TextCorpus):
        r = elbo_bits(model, tokenizer, task.held_out_text(), samples=2, max_windows=limit)
        return "bits_per_char", r["bits_per_char"]
    llm = LLM.from_model(model, tokenizer)
    r = evaluate_task(llm, task, examples=task.validation_set(limit))
    return "accuracy", r.accuracy


def final_metrics(model: DiffusionLM, tokenizer: Tokenizer, task: Task | TextCorpus,
                  limit: int | None = None) -> dict[str, Any]:
    """What a model card reports: test accuracy at one and two tokens per step (tasks), or held-out bits per
    character and samples (text)."""
    llm = LLM.from_model(model, tokenizer)
    if isinstance(task, TextCorpus):
        r = elbo_bits(model, tokenizer, task.held_out_text(), samples=8, max_windows=limit)
        return {"held_out_bits_per_char": round(r["bits_per_char"], 4),
                "held_out_bits_per_byte": round(r["bits_per_byte"], 4),
                "elbo_windows": r["windows"], "elbo_samples_per_window": r["samples_per_window"],
                "samples": text_samples(llm, task)}
    out: dict[str, Any] = {}
    g = task.gen_length
    for policy, steps in (("low_confidence", g), ("low_confidence", g // 2), ("random", g)):
        r = evaluate_task(llm, task, policy, steps=steps, limit=limit)
        out[f"test_accuracy[{policy}, {g // steps} token/step]"] = round(r.accuracy, 4)
    out["test_examples"] = r.n
    return out
