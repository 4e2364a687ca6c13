"""Measure the card's two ceilings (device-to-device copy bandwidth, dense bf16 matmul rate) and write them as JSON;
every floor the GPU suite reports is computed from these, not from datasheets.

    python -m diffuse_engine.bench.ceilings --out OUT/ceilings.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .common import measure_ceilings, stamp


def ceilings(device: str) -> dict:
    """The stamp, the measured ceilings and (CUDA) the card's SM count, memory and capability."""
    result = {**stamp(device), **measure_ceilings(device)}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        result.update({"sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}"})
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure and write ``--out``; print one line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    result = ceilings(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"copy {result['bandwidth_gbs']:.0f} GB/s, matmul {result['peak_tflops']:.1f} TFLOP/s "
          f"({result['matmul_dtype']}) on {result['device']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
