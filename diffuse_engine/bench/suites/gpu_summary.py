"""Print the suite's short tables from the files in its output folder and write them as summary.md (the only file
it writes): kernels and end-to-end rows (op, shape, time, achieved GB/s or TFLOP/s, % of floor, baseline, ratio),
the engine's steady steps per cache and CUDA-graph setting (batch, cache, graphs, step_ms, floor_ms,
pct_of_floor), and where a step's time goes (profile.csv: categories, idle host time, top kernels)."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

PROFILE_COLUMNS = ("GEMM", "attention", "head", "commit", "norms/elementwise", "other", "idle (host)")
TOP_KERNELS = 5


def read_csv(path: Path) -> list[dict]:
    """The rows of ``path``, [] when it does not exist."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def fmt(value: str | None, spec: str = ".4g") -> str:
    """``value`` as a number formatted with ``spec``, else as it is."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return value or ""


def table(rows: list[tuple]) -> list[str]:
    """Rows as left-aligned text columns."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def kernel_rows(out: Path) -> list[tuple]:
    """Kernel benchmarks: kernels.csv (this suite), or attention.csv / sampling.csv / noise.csv (earlier runs)."""
    rows = []
    for r in read_csv(out / "noise.csv"):
        if r.get("provider") == "torch":
            continue
        rows.append((f"noise_{r.get('op', '')}/{r.get('provider', '')}", r.get("shape", ""), r.get("ms", ""),
                     f"{r.get('gbps', '')} GB/s", r.get("pct_copy_bw", ""), "torch reference",
                     r.get("ratio_vs_torch", "")))
    kernels = read_csv(out / "kernels.csv") + read_csv(out / "attention.csv") + read_csv(out / "sampling.csv")
    for r in kernels:
        if r.get("ratio_vs_sdpa"):  # attention rows
            if r.get("provider") == "sdpa":
                continue
            achieved = (f"{fmt(r.get('tflops'), '.1f')} TFLOP/s" if r.get("tflops")
                        else f"{fmt(r.get('gbps'), '.0f')} GB/s")
            rows.append((f"attn_{r['op']}/{r['provider']}", r["shape"], fmt(r["ms"]), achieved,
                         fmt(r["pct_floor"], ".1f"), "torch SDPA", fmt(r["ratio_vs_sdpa"], ".2f")))
        else:
            if r.get("provider") in ("torch", "matmul+torch"):
                continue
            achieved = f"{fmt(r.get('gbps'), '.0f')} GB/s" + (f", {fmt(r['tflops'], '.1f')} TFLOP/s"
                                                             if r.get("tflops") else "")
            rows.append((f"{r['op']}/{r['provider']}", r["shape"], fmt(r["ms"]), achieved, fmt(r["pct_floor"], ".1f"),
                         r.get("baseline", ""), fmt(r.get("ratio"), ".2f")))
    return rows


def main(out: Path) -> str:
    """Print the summary of the suite folder ``out`` and write it as ``out/summary.md``; returns the text."""
    lines = []
    ceil_path = out / "ceilings.json"
    if ceil_path.exists():
        c = json.loads(ceil_path.read_text())
        lines.append(f"device: {c['device']}  copy {float(c['bandwidth_gbs']):.0f} GB/s  "
                     f"matmul {float(c['peak_tflops']):.1f} TFLOP/s ({c['matmul_dtype']})  commit {c['commit']}")
    junit = out / "gpu-tests.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        lines.append(f"gpu tests: {suite.get('tests')} run, {suite.get('failures')} failed, {suite.get('errors')} "
                     f"errors, {suite.get('skipped')} skipped")
    main_rows = [("op", "shape", "time_ms", "achieved", "%floor", "baseline", "ratio"), *kernel_rows(out)]
    for r in read_csv(out / "cache.csv"):
        if r.get("setting") == "reference loop":
            continue
        main_rows.append((f"cache {r.get('setting', '')}", f"{r.get('workload', '')} batch {r.get('batch', '')}",
                          f"{1e3 * float(r.get('seconds') or 0):.1f}", f"{r.get('tokens_per_s', '')} tok/s", "",
                          "reference loop", r.get("speedup", "")))
    engine = read_csv(out / "engine.csv")
    steady = [r for r in engine if r.get("timing") == "steady"]
    for r in engine:
        if r.get("timing") == "steady":
            continue
        cache = r.get("cache") or "none"
        shape = (f"B={r['batch']} P={r['prompt_len']} G={r['gen_length']} blk={r['block_length']} "
                 f"tps={r['tokens_per_step']}" + (f" cache={cache}" if cache != "none" else ""))
        main_rows.append(("engine_step", shape, r["step_ms"], f"{r['engine_tok_s']} tok/s",
                          r.get("pct_of_floor") or "",
                          f"ref {r['reference_tok_s']} tok/s" if r.get("reference_tok_s") else "",
                          r.get("speedup") or ""))
    if len(main_rows) > 1:
        lines += table(main_rows)
    if steady:
        first = steady[0]
        lines += ["", f"engine steps, steady state ({first.get('preset', '')}, {first.get('dtype', '')}, "
                      f"P={first.get('prompt_len', '')} G={first.get('gen_length', '')} "
                      f"blk={first.get('block_length', '')}, fixed schedule; floor = max(bytes / copy BW, "
                      f"FLOPs / matmul peak))"]
        rows = [("batch", "cache", "graphs", "tps", "step_ms", "floor_ms", "pct_of_floor", "bound", "tok/s",
                 "recomputed/seq", "cached/seq")]
        rows += [(r["batch"], r["cache"], r.get("cuda_graphs", ""), r.get("tokens_per_step", ""), r["step_ms"],
                  r.get("floor_ms", ""), r.get("pct_of_floor", ""), r.get("bound", ""), r.get("engine_tok_s", ""),
                  r.get("query_tokens", ""), r.get("context_tokens", "")) for r in steady]
        lines += table(rows)
    lines += profile_lines(read_csv(out / "profile.csv"))
    text = "\n".join(lines)
    (out / "summary.md").write_text("```\n" + text + "\n```\n")
    print(text)
    return text


def profile_lines(rows: list[dict]) -> list[str]:
    """Per batch: the step's span, each category and the idle host time (ms and % of the step), the top kernels
    (the breakdown rows of ``profile step --breakdown``: the eager variant's when graphs were profiled too)."""
    rows = [r for r in rows if r.get("kind") and r.get("variant", "eager") in ("eager", "")]
    if not rows:
        return []
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    first = rows[0]
    lines = ["", f"where a step's time goes ({first.get('preset', '')}, {first.get('dtype', '')}, cache "
                 f"{first.get('cache', '')}, {first.get('policy', '')} {first.get('threshold', '')}, "
                 f"{first.get('source', '')}; ms (% of the profiled step))"]
    head = [("batch", "step_ms", "unprofiled_ms", *PROFILE_COLUMNS)]
    for b in batches:
        mine = [r for r in rows if r["batch"] == b]
        by_name = {r["name"]: r for r in mine if r["kind"] in ("category", "idle")}
        cells = [f"{fmt(by_name[c]['ms'], '.3f')} ({fmt(by_name[c]['pct_of_step'], '.1f')}%)" if c in by_name else ""
                 for c in PROFILE_COLUMNS]
        head.append((b, fmt(mine[0].get("step_ms"), ".3f"), fmt(mine[0].get("step_ms_unprofiled"), ".3f"), *cells))
    lines += table(head)
    kernels = [("batch", "top kernel", "category", "calls", "ms", "%step")]
    for b in batches:
        top = [r for r in rows if r["batch"] == b and r["kind"] == "kernel"][:TOP_KERNELS]
        kernels += [(b, r["name"] if len(r["name"]) <= 60 else r["name"][:57] + "...", r["category"], r["calls"],
                     fmt(r["ms"], ".3f"), fmt(r["pct_of_step"], ".1f")) for r in top]
    if len(kernels) > 1:
        lines += table(kernels)
    return lines

