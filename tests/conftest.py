"""Session setup: without a CUDA device, Triton kernels run on the CPU interpreter. TRITON_INTERPRET is read when
triton decorates its functions (its own standard library included), so it must be set before anything imports
triton; setting it here, before any test module is imported, makes every test file runnable on its own. The ``module``
fixture gives the native tests their module."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def module():
    """The native module diffuse_engine._C; its tests skip when it is not built, unless DIFFUSE_REQUIRE_NATIVE=1
    (CI sets it: there the build must have happened)."""
    from diffuse_engine import ops

    mod, why = ops.native_status()
    if mod is None:
        if os.environ.get("DIFFUSE_REQUIRE_NATIVE", "0") == "1":
            pytest.fail(f"DIFFUSE_REQUIRE_NATIVE=1 but the native module diffuse_engine._C is unavailable: {why}")
        pytest.skip(f"native module not built: {why}")
    return mod
