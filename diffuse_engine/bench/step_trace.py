"""Where one engine step's time goes, from a ``torch.profiler`` Chrome trace: each kernel (CUDA) or top-level aten op
(CPU) goes to a category (:func:`categorize`, by :data:`RULES`), and :func:`breakdown` sums them per ``engine.step``
range with the device's idle time (before the first kernel, between kernels, after the last).

A step's span runs from its ``engine.step`` range's start to the later of its end and its last kernel's end;
``idle (host)`` = span - the union of the kernels' busy intervals. Category times sum kernel durations (one stream:
no overlap). :func:`breakdown_rows` turns a breakdown into CSV rows (kind = step, category, idle, idle_part,
kernel). Used by :mod:`.step_profile` and ``diffuse-engine profile step --trace``.
"""

from __future__ import annotations

import re

CATEGORIES = ("GEMM", "attention", "head", "commit", "norms/elementwise", "other")
MARKER = "engine.step"
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")

# How a kernel (CUDA) or top-level aten op (CPU) name maps to a category: rules tried in this order, the first
# whose pattern (a case-insensitive regular expression searched in the name) matches wins; no match: "other".
# The order settles names that match two rules: attention kernels built on cutlass (fmha_cutlassF...) are
# attention, not GEMM; aten::addmm is GEMM, not an elementwise "add"; host<->device copies and memsets run on the
# copy engines and go to "other" before "copy" could claim them. The LM head's matmul counts under "head" only
# when fused (lm_head_stats); an unfused head's matmul is a GEMM like the others (names alone cannot tell).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("other", (r"^memcpy", r"^memset")),
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa", "scaled_dot_product", "combine_splits")),
    ("head", ("row_stats", "lm_head", "softmax", "argmax", "topk", "gumbel", "noise", "sample", r"^_merge_kernel$")),
    ("commit", ("commit",)),
    ("GEMM", ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "matmul", r"\bsm\d\d_",
              r"^aten::(linear|addmm|mm|bmm|baddbmm|addbmm)$")),
    ("norms/elementwise", ("rms", "norm", "rope", "rotary", "elementwise", "vectorized", "add", "mul", "copy", "cat",
                           "index", "silu", "gelu", "neg", "rsqrt", "pow", "embedding", "where", "fill",
                           r"^aten::to$")),
)
_RULES = [(category, re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE))
          for category, patterns in RULES]


def categorize(name: str) -> str:
    """The category (one of :data:`CATEGORIES`) of a kernel or aten op called ``name``, by :data:`RULES`."""
    for category, pattern in _RULES:
        if pattern.search(name):
            return category
    return "other"


# ------------------------------------------------------------------------------------------------ trace analysis
def _span(e: dict) -> tuple[float, float]:
    return float(e["ts"]), float(e["ts"]) + float(e.get("dur") or 0.0)


def _top_level(ops: list[dict]) -> list[dict]:
    """The ops that no other op of the same thread encloses."""
    out = []
    by_thread: dict[tuple, list[dict]] = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur") or 0.0)))
        end = float("-inf")
        for e in events:
            start, stop = _span(e)
            if start >= end:  # else nested in the op that ends at ``end``
                out.append(e)
                end = stop
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def breakdown(trace: dict, keep: list[int] | None = None, marker: str = MARKER) -> dict:
    """Average breakdown (microseconds per step) of the ``marker`` ranges of a Chrome trace exported by
    ``torch.profiler`` (the ``keep``-th ranges only, in time order; None: all). Device events (kernels, copies,
    memsets) when the trace has any, else top-level CPU ops."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == marker),
                   key=lambda e: float(e["ts"]))
    if not steps:
        raise ValueError(f"the trace has no {marker!r} range.")
    device = [e for e in events if e.get("cat") in DEVICE_EVENTS]
    work = device if device else _top_level([e for e in events if e.get("cat") == "cpu_op"])
    launches = [e for e in events if e.get("cat") == "cuda_runtime" and "GraphLaunch" in str(e.get("name"))]
    chosen = range(len(steps)) if keep is None else keep
    if not chosen:
        raise ValueError("no step to analyse.")
    acc = {"span": 0.0, "before": 0.0, "between": 0.0, "after": 0.0, "graph_launches": 0.0,
           "categories": dict.fromkeys(CATEGORIES, 0.0), "calls": dict.fromkeys(CATEGORIES, 0.0), "kernels": {}}
    for i in chosen:
        lo = float(steps[i]["ts"])
        hi = float(steps[i + 1]["ts"]) if i + 1 < len(steps) else float("inf")
        mine = [e for e in work if lo <= float(e["ts"]) < hi]
        start, end = _span(steps[i])
        if mine:
            end = max(end, max(_span(e)[1] for e in mine))
        intervals = [(max(s, start), min(t, end)) for s, t in map(_span, mine)]
        busy = _union(intervals)
        span = end - start
        first = min((s for s, _ in intervals), default=end)
        last = max((t for _, t in intervals), default=end)
        acc["span"] += span
        acc["before"] += first - start
        acc["after"] += end - last if mine else 0.0
        acc["between"] += (last - first) - busy if mine else 0.0
        acc["graph_launches"] += sum(1 for e in launches if lo <= float(e["ts"]) < hi)
        for e, (s, t) in zip(mine, intervals, strict=True):
            name = str(e.get("name"))
            category = categorize(name)
            acc["categories"][category] += t - s
            acc["calls"][category] += 1
            calls, total = acc["kernels"].get(name, (0, 0.0))
            acc["kernels"][name] = (calls + 1, total + t - s)
    n = len(chosen)
    return {"source": "cuda kernels" if device else "cpu ops", "steps": n, "span_us": acc["span"] / n,
            "idle_us": (acc["before"] + acc["between"] + acc["after"]) / n,
            "idle_parts_us": {"before first kernel": acc["before"] / n, "between kernels": acc["between"] / n,
                              "after last kernel": acc["after"] / n},
            "categories_us": {c: v / n for c, v in acc["categories"].items()},
            "calls": {c: v / n for c, v in acc["calls"].items()},
            "kernels_us": {k: (c / n, t / n) for k, (c, t) in acc["kernels"].items()},
            "graph_launches": acc["graph_launches"] / n}


def breakdown_rows(b: dict, top: int = 15) -> list[dict]:
    """CSV rows of a :func:`breakdown`: step, categories, idle, idle parts, top kernels (ms and % of the step)."""
    span = b["span_us"]

    def row(kind: str, name: str, category: str, calls: float | str, us: float) -> dict:
        return {"kind": kind, "name": name, "category": category,
                "calls": round(calls, 2) if isinstance(calls, float) else calls,
                "ms": round(us / 1e3, 4), "pct_of_step": round(100 * us / span, 2) if span else 0.0}

    rows = [row("step", "step", "", "", span)]
    rows += [row("category", c, c, b["calls"][c], b["categories_us"][c]) for c in CATEGORIES]
    rows.append(row("idle", "idle (host)", "idle", "", b["idle_us"]))
    rows += [row("idle_part", name, "idle", "", us) for name, us in b["idle_parts_us"].items()]
    ranked = sorted(b["kernels_us"].items(), key=lambda kv: -kv[1][1])[:top]
    rows += [row("kernel", name, categorize(name), calls, us) for name, (calls, us) in ranked]
    return rows
