"""Print the suite's short table from the files in its output folder and write it as summary.md:
op, shape, time, achieved GB/s or TFLOP/s, % of floor, baseline, ratio."""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def main(out: Path) -> None:
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
    table = [("op", "shape", "time_ms", "achieved", "%floor", "baseline", "ratio")]
    for r in read_csv(out / "noise.csv"):
        if r.get("provider") == "torch":
            continue
        table.append((f"noise_{r.get('op', '')}/{r.get('provider', '')}", r.get("shape", ""), r.get("ms", ""),
                      f"{r.get('gbps', '')} GB/s", r.get("pct_copy_bw", ""), "torch reference",
                      r.get("ratio_vs_torch", "")))
    for r in read_csv(out / "attention.csv"):
        if r.get("provider") == "sdpa":
            continue
        achieved = f"{float(r['tflops']):.1f} TFLOP/s" if r.get("tflops") else f"{float(r['gbps']):.0f} GB/s"
        table.append((f"attn_{r['op']}/{r['provider']}", r["shape"], f"{float(r['ms']):.4g}", achieved,
                      f"{float(r['pct_floor']):.1f}", "torch SDPA", f"{float(r['ratio_vs_sdpa']):.2f}"))
    for r in read_csv(out / "sampling.csv"):
        if r.get("provider") in ("torch", "matmul+torch"):
            continue
        achieved = f"{float(r['gbps']):.0f} GB/s" + (f", {float(r['tflops']):.1f} TFLOP/s" if r.get("tflops") else "")
        table.append((f"{r['op']}/{r['provider']}", r["shape"], f"{float(r['ms']):.4g}", achieved,
                      f"{float(r['pct_floor']):.1f}", r["baseline"], f"{float(r['ratio']):.2f}"))
    for r in read_csv(out / "cache.csv"):
        if r.get("setting") == "reference loop":
            continue
        table.append((f"cache {r.get('setting', '')}", f"{r.get('workload', '')} batch {r.get('batch', '')}",
                      f"{1e3 * float(r.get('seconds') or 0):.1f}", f"{r.get('tokens_per_s', '')} tok/s", "",
                      "reference loop", r.get("speedup", "")))
    for r in read_csv(out / "engine.csv"):
        shape = (f"B={r['batch']} P={r['prompt_len']} G={r['gen_length']} blk={r['block_length']} "
                 f"tps={r['tokens_per_step']}")
        table.append(("engine_step", shape, r["step_ms"], f"{r['engine_tok_s']} tok/s", r.get("pct_of_floor") or "",
                      f"ref {r['reference_tok_s']} tok/s" if r.get("reference_tok_s") else "",
                      r.get("speedup") or ""))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    text = "\n".join(lines)
    (out / "summary.md").write_text("```\n" + text + "\n```\n")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
