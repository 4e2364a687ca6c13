"""Session setup: without a CUDA device, Triton kernels run on the CPU interpreter. TRITON_INTERPRET is read when
triton decorates its functions (its own standard library included), so it must be set before anything imports
triton; setting it here, before any test module is imported, makes every test file runnable on its own. The ``module``
fixture gives the native tests their module.

``ops`` reads DIFFUSE_BACKEND, DIFFUSE_ATTENTION_BACKEND and TRITON_INTERPRET once (``ops.reload()`` re-reads them):
a test that changes one sets it through the ``backend_env`` fixture, which reloads at once and again at teardown, so
that no test leaks its settings into the next; ``_ops_settings_match_the_environment`` fails a test that leaves the
settings out of step with the environment."""

from __future__ import annotations

import os
import sys

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


@pytest.fixture
def backend_env():
    """A setter ``set(name, value)`` for the variables that ops reads once (``value`` None unsets it): it changes the
    environment and calls ``ops.reload()`` (unless ``reload=False``, for tests of the reload itself); at teardown the
    environment is restored and ops reloaded."""
    from diffuse_engine import ops

    patch = pytest.MonkeyPatch()

    def set_env(name: str, value: str | None, *, reload: bool = True) -> None:
        if value is None:
            patch.delenv(name, raising=False)
        else:
            patch.setenv(name, value)
        if reload:
            ops.reload()

    yield set_env
    patch.undo()
    ops.reload()


@pytest.fixture(autouse=True)
def _ops_settings_match_the_environment():
    """After each test: ops' settings must equal what the (restored) environment says."""
    yield
    backend = sys.modules.get("diffuse_engine.ops.backend")
    if backend is not None and backend._SETTINGS is not None and backend._SETTINGS != backend.Settings.from_env():
        backend.reload()
        pytest.fail("the test left ops' backend settings out of step with the environment: change DIFFUSE_BACKEND, "
                    "DIFFUSE_ATTENTION_BACKEND or TRITON_INTERPRET through the backend_env fixture")
