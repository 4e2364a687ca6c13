"""Sampling statistics of a vocabulary split in slices (the tensor-parallel LM head): each slice reduces its logits to
a few numbers per row, and those numbers, never the logits, are combined into the statistics of the whole row.

Semantics are those of :func:`kernels.sample_torch.sample_rows` without top-k / top-p (the unfused head) and, with
``entropy_eps=0``, of :func:`kernels.reference.row_stats_reference` (the fused head): the token is the argmax of
``z + G`` (``z = logits / T``, counter-based Gumbel noise keyed by the *global* vocabulary id, so a slice draws
exactly the numbers the whole row draws in its columns), ties going to the lowest id; scores come from the
confidence logits (``z``, or the raw logits with excluded columns for rows with ``raw_confidence``).

Per slice and row (:func:`slice_partials`, one ``[M, P]`` tensor in the work dtype): the best noisy value and its
global id, the confidence logit at that id, the slice's largest and second largest confidence logits ``mx_r`` and
``m2_r``, ``s_r = sum exp(q - mx_r)``, ``u_r = sum exp(q - mx_r) (q - mx_r)`` and whether the slice holds NaN or
+inf. :func:`combine_partials` reduces them over slices (``[R, M, P]``):

- ``mx = max_r mx_r``, ``s = sum_r s_r exp(mx_r - mx)``, ``prob = exp(q_token - mx) / s``, ``top1 = 1 / s``;
- ``margin = top1 - exp(second - mx) / s`` with ``second`` the second largest of every slice's two largest;
- exact ``neg_entropy = sum_r exp(mx_r - mx) (u_r + (mx_r - mx) s_r) / s - log s`` (= sum q log q). With
  ``entropy_eps > 0`` (Dream's ``q log(q + eps)``) it needs the global ``mx`` and ``s`` first: each slice sums its
  share (:func:`slice_neg_entropy`) and the shares are added.

The combined values equal the single-device statistics up to the order of floating-point sums (the tokens are
identical; in fp64 the scores agree to about 1e-15).
"""

from __future__ import annotations

import torch

from ..kernels.reference import STREAM_SAMPLE, counter_gumbel

# Columns of a slice's partial statistics.
P_NOISY, P_TOKEN, P_QTOKEN, P_MAX, P_SECOND, P_SUM, P_USUM, P_BAD = range(8)
NUM_PARTIALS = 8


def _confidence_logits(x: torch.Tensor, z: torch.Tensor, col_lo: int, raw_confidence: torch.Tensor | None,
                       conf_exclude: torch.Tensor | None, any_raw: bool, all_raw: bool,
                       any_exclude: bool) -> torch.Tensor:
    """The rows' confidence logits: ``z``, or for rows with ``raw_confidence`` the raw logits with their excluded
    columns (global ids) at -inf. Returns ``z`` itself when no row is raw (no copy)."""
    if raw_confidence is None or not any_raw:
        return z
    raw_rows = raw_confidence.bool()
    raw = x
    if any_exclude and conf_exclude is not None and conf_exclude.numel():
        # The excluded columns that fall in this slice, as a mask (a scatter: no read of a device value).
        ids = conf_exclude.to(torch.int64).reshape(x.shape[0], -1)
        cols = ids - col_lo
        inside = (ids >= 0) & (cols >= 0) & (cols < x.shape[1]) & raw_rows[:, None]
        hit = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        hit.scatter_reduce_(1, cols.clamp(0, x.shape[1] - 1), inside.to(torch.uint8), reduce="amax")
        raw = x.masked_fill(hit.bool(), float("-inf"))
    return raw if all_raw or raw is z else torch.where(raw_rows[:, None], raw, z)


def slice_partials(logits: torch.Tensor, col_lo: int, temperature: torch.Tensor, seed: torch.Tensor,
                   step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor | None = None,
                   conf_exclude: torch.Tensor | None = None,
                   scores: tuple[str, ...] = ("margin", "neg_entropy"),
                   flags: tuple[bool, bool, bool, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial statistics ``[M, NUM_PARTIALS]`` of the logits slice ``[M, V_r]`` holding the global columns
    ``col_lo .. col_lo + V_r - 1``, and the slice's confidence logits (for :func:`slice_neg_entropy`). Per-row
    arguments as :func:`kernels.reference.row_stats_reference` (``conf_exclude`` holds global ids). ``scores``:
    the optional statistics to prepare (``margin`` needs the second largest logit, ``neg_entropy`` one more pass);
    the columns of the others are left at zero. Three passes over the slice when neither is asked for.
    ``flags``: what the host knows of the rows, ``(any_hot, any_raw, all_raw, any_exclude)`` (the engine's plan);
    with them nothing here reads a device value (no synchronisation on CUDA); None: read from the tensors."""
    m, v = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(work)
    temperature = temperature.to(device=x.device, dtype=work)
    hot = temperature > 0
    if flags is None:
        raw_any = raw_confidence is not None and bool(raw_confidence.any())
        flags = (bool(hot.any()), raw_any, raw_any and bool(raw_confidence.all()),
                 conf_exclude is not None and bool((conf_exclude >= 0).any()))
    any_hot, any_raw, all_raw, any_exclude = flags
    z = x / torch.where(hot, temperature, torch.ones_like(temperature))[:, None] if any_hot else x
    noisy = z
    if any_hot:
        g = counter_gumbel(seed, step, position, STREAM_SAMPLE, v, col_lo).to(work)
        noisy = torch.where(hot[:, None], z + g, z)
    q = _confidence_logits(x, z, col_lo, raw_confidence, conf_exclude, any_raw, all_raw, any_exclude)
    best, arg = noisy.max(dim=-1)
    zero = torch.zeros_like(best)
    second = torch.full_like(best, float("-inf"))
    if "margin" in scores and v > 1:
        top2 = q.topk(2, dim=-1).values
        mx, second = top2[:, 0], top2[:, 1]
    else:
        mx = best if q is noisy else q.max(dim=-1).values
    q_tok = best if q is noisy else q.gather(1, arg[:, None]).squeeze(1)
    empty = mx == float("-inf")
    shift = torch.where(empty, zero, mx)
    e = torch.sub(q, shift[:, None]).exp_()
    s = torch.where(empty, zero, e.sum(-1))
    u = torch.special.xlogy(e, e).sum(-1) if "neg_entropy" in scores else zero  # e log e = e (q - mx), 0 at e = 0
    # NaN propagates through max, so a NaN (or +inf) anywhere shows in the maxima.
    bad = torch.isnan(mx) | (mx == float("inf")) | torch.isnan(best)
    parts = torch.stack((best, (arg + col_lo).to(work), q_tok, mx, second, s, u, bad.to(work)), dim=1)
    return parts, q


def combine_partials(parts: torch.Tensor,
                     scores: tuple[str, ...] = ("margin", "neg_entropy")) -> dict[str, torch.Tensor]:
    """The row statistics from every slice's partials ``[R, M, NUM_PARTIALS]`` (slices in vocabulary order): keys
    ``token`` (int64, -1 on invalid rows), ``prob``, ``top1``, those of ``margin`` and ``neg_entropy`` (exact) that
    ``scores`` names (the partials must have prepared them), ``invalid``
    (int32), and ``mx`` / ``s`` (the global maximum and normaliser, for :func:`slice_neg_entropy`). Invalid rows
    (NaN or +inf anywhere, or no finite confidence logit) get NaN scores."""
    best = parts[:, :, P_NOISY]
    win = best.argmax(0)  # first slice holding the maximum: the lowest global id among ties
    pick = lambda col: parts[:, :, col].gather(0, win[None, :]).squeeze(0)  # noqa: E731
    token = pick(P_TOKEN).to(torch.int64)
    q_tok = pick(P_QTOKEN)
    mxs = parts[:, :, P_MAX]
    mx = mxs.max(0).values
    scale = torch.where(mxs == float("-inf"), torch.zeros_like(mxs), (mxs - mx[None, :]).exp())
    s = (parts[:, :, P_SUM] * scale).sum(0)
    cands = torch.cat((mxs, parts[:, :, P_SECOND]), dim=0)
    second = cands.topk(2, dim=0).values[1] if cands.shape[0] > 1 else torch.full_like(mx, float("-inf"))
    top1 = 1.0 / s
    prob = (q_tok - mx).exp() / s
    margin = top1 - (second - mx).exp() / s
    shifted = torch.where(mxs == float("-inf"), torch.zeros_like(mxs), mxs - mx[None, :])
    neg_entropy = (scale * (parts[:, :, P_USUM] + shifted * parts[:, :, P_SUM])).sum(0) / s - s.log()
    invalid = (parts[:, :, P_BAD].sum(0) > 0) | ~torch.isfinite(mx) | ~torch.isfinite(s) | ~(s > 0)
    nan = torch.full_like(mx, float("nan"))
    out = {"token": torch.where(invalid, torch.full_like(token, -1), token), "invalid": invalid.to(torch.int32)}
    for key, value in (("prob", prob), ("top1", top1), ("margin", margin), ("neg_entropy", neg_entropy)):
        if key in ("prob", "top1") or key in scores:
            out[key] = torch.where(invalid, nan, value)
    out["mx"], out["s"] = mx, s
    return out


def slice_neg_entropy(q: torch.Tensor, mx: torch.Tensor, s: torch.Tensor, entropy_eps: float) -> torch.Tensor:
    """A slice's share ``sum q log(q + eps)`` ``[M]`` of the negative entropy, with ``q = exp(q_logits - mx) / s``
    from the combined ``mx`` and ``s`` (summed over slices, it is Dream's formula of the whole row)."""
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = (q - safe[:, None]).exp() / s[:, None]
    return torch.special.xlogy(p, p + entropy_eps).sum(-1)


def split_columns(vocab_size: int, num_slices: int) -> list[tuple[int, int]]:
    """The column ranges of ``num_slices`` slices of a vocabulary: equal widths ``ceil(V / R)`` (the last one
    shorter; every slice non-empty)."""
    if not 1 <= num_slices <= vocab_size:
        raise ValueError(f"cannot split a vocabulary of {vocab_size} columns into {num_slices} non-empty slices.")
    width = -(-vocab_size // num_slices)
    ranges = [(r * width, min(vocab_size, (r + 1) * width)) for r in range(num_slices)]
    if any(hi <= lo for lo, hi in ranges):
        raise ValueError(f"cannot split a vocabulary of {vocab_size} columns into {num_slices} non-empty slices of "
                         f"{width} columns.")
    return ranges


def sliced_row_stats(logits: torch.Tensor, num_slices: int, temperature: torch.Tensor, seed: torch.Tensor,
                     step: torch.Tensor, position: torch.Tensor, *, raw_confidence: torch.Tensor | None = None,
                     conf_exclude: torch.Tensor | None = None, entropy_eps: float = 0.0,
                     scores: tuple[str, ...] = ("margin", "neg_entropy")) -> dict[str, torch.Tensor]:
    """The statistics of ``logits`` ``[M, V]`` computed slice by slice in one process (what the tensor-parallel head
    computes across ranks; for tests and benchmarks)."""
    ranges = split_columns(logits.shape[1], num_slices)
    outs = [slice_partials(logits[:, lo:hi], lo, temperature, seed, step, position, raw_confidence=raw_confidence,
                           conf_exclude=conf_exclude, scores=scores) for lo, hi in ranges]
    out = combine_partials(torch.stack([p for p, _ in outs]), scores)
    if entropy_eps > 0 and "neg_entropy" in scores:
        share = sum(slice_neg_entropy(q, out["mx"], out["s"], entropy_eps) for _, q in outs)
        out["neg_entropy"] = torch.where(out["invalid"].bool(), out["neg_entropy"], share)
    return out
