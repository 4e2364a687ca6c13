"""The reference loop the engine and cache suites compare against: LLaDA's published ``generate()``, re-expressed in
the checkout's test oracle (``tests/oracles.py``). An installed package has no ``tests/``: the reference is then
unavailable and the suites skip its rows, saying why (its code is not copied into the package)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from .common import ROOT

ORACLE = ROOT / "tests" / "oracles.py"
_loaded: ModuleType | None = None


def oracle() -> ModuleType | None:
    """``tests/oracles.py`` of the checkout the package runs from, or None outside a checkout."""
    global _loaded
    if _loaded is None and ORACLE.is_file():
        spec = importlib.util.spec_from_file_location("diffuse_engine_bench_oracles", ORACLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _loaded = module
    return _loaded


def unavailable_reason() -> str:
    """Why the reference rows are skipped (empty when the oracle is available)."""
    if oracle() is not None:
        return ""
    return (f"the reference loop lives in the checkout's tests/oracles.py, not in the installed package ({ORACLE} "
            f"is missing): reference rows skipped.")


def llada_generate(model, x, **kw):
    """The oracle's ``llada_generate`` (see :func:`oracle`); a RuntimeError outside a checkout."""
    module = oracle()
    if module is None:
        raise RuntimeError(unavailable_reason())
    return module.llada_generate(model, x, **kw)
