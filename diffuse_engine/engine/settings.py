"""The per-request settings a step plan uploads (:func:`.plan.build_plan`): seeds and sampling, the step
counters the device advances, commit rules and counts, orderings, revision policies. Each function adds its
arrays to the plan's :class:`~.canvas.Upload` and returns the host values that choose the step's code paths."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..policies import ORDERINGS, decoding_policy, ordering_flags, revision_policy
from .canvas import Upload
from .request import Request

REMDM_VARIANTS = {"cap": 0, "rescale": 1, "conf": 2}


@dataclass(slots=True)
class Sampling:
    """Per-request sampling settings as arrays over the batch (what decides the head's code paths)."""

    temps: np.ndarray
    raw: np.ndarray
    any_exclude: bool
    top_k: np.ndarray
    top_p: np.ndarray
    eos_inf: np.ndarray


def sampling(up: Upload, requests: list[Request], row_req_all: np.ndarray, eot_id: int | None,
              eos_id: int) -> Sampling:
    """Seeds and the head's per-row sampling settings."""
    p = [r.params for r in requests]
    seeds = [r.seed_bits for r in requests]
    up.add("seed", seeds, torch.int64)
    up.add("row_seed", np.asarray(seeds, dtype=np.int64)[row_req_all], torch.int64)
    temps = np.asarray([x.temperature for x in p], dtype=np.float64)
    up.add("row_temp", temps[row_req_all], torch.float32)
    raw = np.asarray([ORDERINGS[r.remasking].raw for r in requests])
    up.add("row_raw", raw[row_req_all], torch.bool)
    # LLaDA's confidence_eos_eot_inf as published: `logits_with_noise[:, :, eos] = logits[:, :, eot] = -inf` after
    # sampling. At temperature 0 `add_gumbel_noise` returns the logits tensor itself, so EOS leaves the confidence
    # softmax too; at temperature > 0 only EOT does.
    exclude = np.asarray([[eot_id, eos_id if x.temperature == 0 else -1] if x.confidence_eos_eot_inf else [-1, -1]
                          for x in p], dtype=np.int64)
    any_exclude = bool((exclude >= 0).any())
    if any_exclude:
        up.add("row_exclude", exclude[row_req_all], torch.int64)
    top_k = np.asarray([x.top_k or 0 for x in p], dtype=np.int64)
    top_p = np.asarray([x.top_p if x.top_p is not None else 1.0 for x in p], dtype=np.float64)
    eos_inf = np.asarray([x.logits_eos_inf for x in p])
    if top_k.any():
        up.add("row_top_k", top_k[row_req_all], torch.int64)
    if (top_p < 1).any():
        up.add("row_top_p", top_p[row_req_all], torch.float32)
    if eos_inf.any():
        up.add("row_eos_inf", eos_inf[row_req_all], torch.bool)
    return Sampling(temps, raw, any_exclude, top_k, top_p, eos_inf)


def counters(up: Upload, requests: list[Request], windows: list[tuple[int, int]]) -> None:
    """The step counters the device advances, and each request's block within its window."""
    up.add("nfe", [r.nfe for r in requests], torch.int64)
    up.add("block_step", [r.block_step for r in requests], torch.int64)
    up.add("block_col", [r.block_span[0] - windows[i][0] for i, r in enumerate(requests)], torch.int64)
    up.add("block_len", [r.block_span[1] - r.block_span[0] for r in requests], torch.int64)


def rules(up: Upload, requests: list[Request]) -> None:
    """Each request's commit rule (its decoding policy's) and per-step counts / timesteps."""
    p = [r.params for r in requests]
    nb = len(requests)
    modes, kinds, thresholds, factors, gammas = [], [], [], [], []
    steps = max(x.steps_per_block for x in p)
    counts = np.zeros((nb, steps), dtype=np.int64)
    timesteps = np.ones((nb, steps + 1), dtype=np.float64)
    for i, r in enumerate(requests):
        rule = decoding_policy(r).rule(r)
        modes.append(rule.mode)
        kinds.append(rule.count_kind)
        thresholds.append(rule.threshold)
        factors.append(rule.factor)
        gammas.append(rule.eb_gamma)
        counts[i, :len(r.block_counts)] = r.block_counts
        if r.timesteps is not None:
            timesteps[i, :r.timesteps.shape[0]] = r.timesteps.numpy()
    up.add("mode", modes, torch.int32)
    up.add("count_kind", kinds, torch.int64)
    up.add("threshold", thresholds, torch.float32)
    up.add("factor", factors, torch.float32)
    up.add("gamma", gammas, torch.float32)
    up.add("spb", [x.steps_per_block for x in p], torch.int64)
    up.add("counts", counts, torch.int64)
    up.add("timesteps", timesteps, torch.float32)


def orderings(up: Upload, requests: list[Request], score_dtype: torch.dtype
               ) -> tuple[list[str], list[bool], list[bool], list[bool]]:
    """Which score orders each request's commits (and whether the adaptive schedule applies)."""
    p = [r.params for r in requests]
    adaptive = [x.adaptive for x in p]
    up.add("adaptive", adaptive, torch.bool)
    ordering = [r.remasking for r in requests]
    ord_flags = ordering_flags(ordering, adaptive, [x.alg_temp for x in p])
    for name, flags in ord_flags.items():
        up.add(name, flags, torch.bool)
    ord_random, ord_origin, ord_alg = ord_flags["ord_uniform"], ord_flags["ord_coins"], ord_flags["ord_alg"]
    up.add("alg_temp", [x.alg_temp if (x.alg_temp or 0) > 0 else 1.0 for x in p], score_dtype)
    return ordering, ord_random, ord_origin, ord_alg


def revision_settings(up: Upload, requests: list[Request], score_dtype: torch.dtype
                      ) -> tuple[tuple[str, ...], bool]:
    """The revision policies acting this step (request b's is ``revisions[rev_kind[b] - 1]``) and their settings;
    also whether a ReMDM request uses its confidence variant."""
    p = [r.params for r in requests]
    acting = [rev.name if (rev := revision_policy(r)) is not None else None for r in requests]
    revisions = tuple(sorted({a for a in acting if a is not None}))
    rev_kind = [0 if a is None else revisions.index(a) + 1 for a in acting]
    variants = [REMDM_VARIANTS[x.remdm_variant] for x in p]
    up.add("rev_kind", rev_kind, torch.int64)
    up.add("remdm_variant", variants, torch.int64)
    up.add("remdm_eta", [x.remdm_eta for x in p], torch.float64)
    up.add("verify_threshold", [x.verify_threshold for x in p], score_dtype)
    up.add("edit_margin", [x.edit_margin for x in p], score_dtype)
    return revisions, any(a == "remdm" and v == 2 for a, v in zip(acting, variants, strict=True))
