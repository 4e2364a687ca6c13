"""The suites' pictures, as PNG files in the output folder (matplotlib, the ``[plots]`` extra; without it a note is
printed and nothing fails):

- engine: step time vs batch as a roofline: the memory-bound floor (bytes / bandwidth: the weights, read once
  whatever the batch) flat, the compute-bound floor (FLOPs / peak) rising with the batch, the ridge batch where
  they cross, and the measured step times;
- cost-model: step time vs cached context (measured, and the model's prediction), and predicted vs measured;
- quality: accuracy vs NFE and vs seconds (the sweep's own plots)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TOLERANCE = 0.25


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def available() -> bool:
    """Whether matplotlib can be imported."""
    return _pyplot() is not None


def draw(suite: str, rows: list[dict], out: Path) -> list[Path]:
    """The plots of ``suite`` from its ``rows``, written into ``out``; [] (with a printed note) when matplotlib is
    missing or the suite has no plot."""
    if _pyplot() is None:
        print("# plots: matplotlib is not installed (pip install 'diffuse-engine[plots]'): no plots drawn")
        return []
    makers: dict[str, Callable[[list[dict], Path], list[Path]]] = {
        "engine": lambda r, o: [p for p in [roofline(r, o / "engine_roofline.png")] if p],
        "cost-model": lambda r, o: [p for p in [step_vs_context(r, o / "cost_model_context.png"),
                                                predicted_vs_measured(r, o / "cost_model.png")] if p],
        "quality": _quality,
    }
    if suite not in makers or not rows:
        return []
    return makers[suite](rows, out)


def _quality(rows: list[dict], out: Path) -> list[Path]:
    from ..quality.sweep import plot

    return plot(rows, out, "quality")


def _f(row: dict, key: str) -> float | None:
    try:
        return float(row.get(key))
    except (TypeError, ValueError):
        return None


def ridge_batch(memory_ms: float, compute_ms_per_seq: float) -> float:
    """The batch at which the compute floor (rising ``compute_ms_per_seq`` per sequence) meets the flat memory
    floor."""
    return memory_ms / compute_ms_per_seq


def roofline(rows: list[dict], path: Path) -> Path | None:
    """Measured step time vs batch per cache mode, over the two floors and their ridge; None when the rows carry
    no floors (run without ceilings) or a single batch."""
    rows = [r for r in rows if _f(r, "memory_floor_ms") and _f(r, "compute_floor_ms") and _f(r, "step_ms")]
    if len({int(_f(r, "batch")) for r in rows}) < 2:
        print("# plots: the roofline needs rows at two batches or more, with floors: not drawn")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("cache"), r.get("cuda_graphs"), r.get("timing"), r.get("tokens_per_step")),
                          []).append(r)
    top = max(_f(r, "batch") for r in rows)
    for i, (key, pts) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        pts = sorted(pts, key=lambda r: _f(r, "batch"))
        color = plt.cm.tab10(i % 10)
        first = pts[0]
        memory = _f(first, "memory_floor_ms")
        per_seq = _f(first, "compute_floor_ms") / _f(first, "batch")
        ridge = ridge_batch(memory, per_seq)
        lo, hi = min(1.0, ridge / 2), max(top, 2 * ridge)  # both regimes on the picture, whichever side B=1 is
        grid = [lo * 2 ** (k / 4) for k in range(int(4 * (_log2(hi) - _log2(lo))) + 2)]
        label = f"cache {key[0]}, graphs {key[1]}, {key[2]}, {key[3]} tok/step"
        ax.plot([_f(r, "batch") for r in pts], [_f(r, "step_ms") for r in pts], "o-", color=color,
                label=f"measured: {label}")
        ax.plot(grid, [memory] * len(grid), "--", color=color, lw=0.9, label="memory floor (bytes / bandwidth)")
        ax.plot(grid, [per_seq * b for b in grid], ":", color=color, lw=1.2, label="compute floor (FLOPs / peak)")
        ax.axvline(ridge, color=color, lw=0.6, alpha=0.6)
        ax.annotate(f"ridge B={ridge:.3g}", (ridge, memory), textcoords="offset points", xytext=(4, 6), fontsize=7,
                    color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences per step)")
    ax.set_ylabel("step time (ms)")
    first = rows[0]
    ax.set_title(f"engine step vs batch: {first.get('preset', '')}, {first.get('dtype', '')}, {first.get('device', '')}"
                 f"\nmemory-bound left of the ridge, compute-bound right of it", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6, loc="upper left")
    return _save(plt, fig, path)


def _log2(x: float) -> float:
    import math

    return math.log2(max(x, 1e-9))


def step_vs_context(rows: list[dict], path: Path) -> Path | None:
    """Measured (solid) and predicted (dashed) step time vs cached context tokens, one curve per (preset, batch,
    query) of the cost-model suite's ``block`` points; None with fewer than two contexts."""
    rows = [r for r in rows if r.get("case") == "block"]
    if len({_f(r, "context") for r in rows}) < 2:
        print("# plots: step time vs context needs two cached contexts or more: not drawn")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], int(_f(r, "batch")), int(_f(r, "query"))), []).append(r)
    for i, (key, pts) in enumerate(sorted(groups.items())):
        pts = sorted(pts, key=lambda r: _f(r, "context"))
        color = plt.cm.tab20(i % 20)
        xs = [_f(r, "context") for r in pts]
        ax.plot(xs, [_f(r, "measured_ms") for r in pts], "o-", color=color, label=f"{key[0]} B={key[1]} q={key[2]}")
        ax.plot(xs, [_f(r, "predicted_ms") for r in pts], "--", color=color, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("cached context tokens per sequence")
    ax.set_ylabel("step time (ms): measured (solid), cost model (dashed)")
    ax.set_title(f"step time vs cached context, {rows[0].get('device', '')}", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6, ncol=2)
    return _save(plt, fig, path)


def predicted_vs_measured(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Predicted vs measured step time, log-log, with y = x and the +-25% band; None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(6.5, 6))
    markers = {"block": "o", "full": "s"}
    for i, name in enumerate(sorted({r["preset"] for r in rows})):
        for case, marker in markers.items():
            pts = [r for r in rows if r["preset"] == name and r["case"] == case]
            if pts:
                ax.scatter([_f(r, "measured_ms") for r in pts], [_f(r, "predicted_ms") for r in pts], s=18,
                           marker=marker, color=plt.cm.tab10(i), alpha=0.8, label=f"{name} {case}")
    lo = min(min(_f(r, "measured_ms"), _f(r, "predicted_ms")) for r in rows) / 1.5
    hi = max(max(_f(r, "measured_ms"), _f(r, "predicted_ms")) for r in rows) * 1.5
    xs = [lo, hi]
    ax.plot(xs, xs, "k-", lw=1, label="y = x")
    ax.plot(xs, [x * (1 + TOLERANCE) for x in xs], "k--", lw=0.8, label="+-25%")
    ax.plot(xs, [x * (1 - TOLERANCE) for x in xs], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(title or "cost model vs measured", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
