"""Counter-based noise inside Triton kernels: the lowbias32 hash chain of ``kernels/reference.py`` (see its
module docstring), called from other kernels. Integer results are bit-identical to the reference; the Gumbel
transform uses Triton's ``log``, which on a GPU may differ from torch's by an ulp (so a sampled token can differ
from the reference's only where two perturbed logits tie to within that)."""

from __future__ import annotations

import triton
import triton.language as tl

COLUMN_SALT = 0xA511E9B3


@triton.jit
def lowbias32(x):
    """The lowbias32 finaliser of uint32 values (products wrap mod 2**32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def row_key(seed, step, position, stream: tl.constexpr):
    """The per-row hash state (uint32) of int64 ``seed`` (a uint64 bit pattern), ``step``, ``position``."""
    h = lowbias32((seed & 0xFFFFFFFF).to(tl.uint32))
    h = lowbias32(h ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = lowbias32(h ^ (step & 0xFFFFFFFF).to(tl.uint32))
    h = lowbias32(h ^ (position & 0xFFFFFFFF).to(tl.uint32))
    return lowbias32(h ^ stream)


@triton.jit
def uniform(key, cols):
    """Uniforms in (0, 1) (fp32, exact) of the int32 vocabulary columns ``cols`` for the row state ``key``."""
    bits = lowbias32(key ^ lowbias32(cols.to(tl.uint32) ^ 0xA511E9B3))
    return ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23


@triton.jit
def gumbel(key, cols):
    """Standard Gumbel noise -log(-log(u)) of :func:`uniform`."""
    return -tl.log(-tl.log(uniform(key, cols)))
