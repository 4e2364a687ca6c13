"""CPU micro-benchmarks of the kernel ops, one pytest-benchmark group per op, parametrised over the variants of
``diffuse-engine profile`` (:mod:`diffuse_engine.bench.variants`) and two small shapes each. Every variant is
checked against the fp64 reference (the profile's rule) before it is benchmarked; a variant that cannot run here
is skipped with the reason.

    python -m pytest benchmarks --benchmark-only                       # numbers
    python -m pytest benchmarks --benchmark-only --benchmark-autosave  # saved under .benchmarks/
    python -m pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run
"""

from __future__ import annotations

import pytest
import torch

from diffuse_engine.bench.profile import parse_shape
from diffuse_engine.bench.variants import Unavailable, judge, spec

SHAPES = {
    "attention": ["B=1,S=64,H=4,KV=4,D=32", "B=2,L=16,P=128,H=4,KV=4,D=32"],
    "row_stats": ["M=4,V=4097", "M=16,V=32768"],
    "lm_head_stats": ["M=1,V=4097,D=64", "M=16,V=4097,D=64"],
    "commit": ["B=4,R=32", "B=16,R=32"],
    "noise": ["M=4,V=4097,kind=uniform", "M=16,V=32768,kind=gumbel"],
    "moe": ["N=16,D=128,I=64,E=8,K=2", "N=64,D=256,I=128,E=16,K=4"],
}
DEVICE, DTYPE = torch.device("cpu"), torch.float32
_CASES: dict[tuple[str, str], tuple] = {}


def _checked(op_name: str, text: str, variant_name: str):
    """The variant's callable at this shape, after it passed the fp64 check (skips when it cannot run here)."""
    op = spec(op_name)
    if (op_name, text) not in _CASES:
        shape = parse_shape(op, text)
        case = op.make(shape, DTYPE, DEVICE)
        reference = op.reference(case)
        _CASES[op_name, text] = shape, case, reference, op.error(op.plain(case), reference)
    shape, case, reference, plain_err = _CASES[op_name, text]
    variant = op.variants[variant_name]
    reason = variant.available(DEVICE, DTYPE, shape)
    if reason:
        pytest.skip(reason)
    try:
        fn = variant.build(case)
        out = fn()
    except Unavailable as exc:
        pytest.skip(str(exc))
    err = op.error(out, reference)
    assert judge(op, err, plain_err), f"{variant_name} at {text}: error {err} vs plain torch {plain_err}"
    return fn


@pytest.mark.parametrize("op,shape,variant", [pytest.param(op, shape, name, id=f"{op}-{name}-{shape}")
                                              for op in SHAPES for shape in SHAPES[op]
                                              for name in spec(op).variants])
def test_kernel(benchmark, op, shape, variant):
    fn = _checked(op, shape, variant)
    benchmark.group = op  # one group per op: --benchmark-compare lines up the variants of each
    benchmark(fn)
