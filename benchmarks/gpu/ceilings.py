"""Measure the card's two ceilings (device-to-device copy bandwidth, dense bf16 matmul rate) and write them as
JSON; every floor the suite reports is computed from these, not from datasheets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffuse_engine.bench.common import measure_ceilings, stamp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    result = {**stamp(args.device), **measure_ceilings(args.device)}
    if torch.device(args.device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        result.update({"sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"copy {result['bandwidth_gbs']:.0f} GB/s, matmul {result['peak_tflops']:.1f} TFLOP/s "
          f"({result['matmul_dtype']}) on {result['device']}")


if __name__ == "__main__":
    main()
