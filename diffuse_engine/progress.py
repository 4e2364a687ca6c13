"""Progress bars for the long runs (bench, profile, eval, sweep, train): tqdm on standard error when it is a
terminal, nothing otherwise (logs and pipes stay clean). ``DIFFUSE_PROGRESS=1`` forces the bar on, ``0`` off."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled(requested: bool | None = None) -> bool:
    """Whether bars are drawn: ``requested`` when given, else ``DIFFUSE_PROGRESS``, else whether stderr is a
    terminal."""
    if requested is not None:
        return requested
    env = os.environ.get("DIFFUSE_PROGRESS", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


class _Silent:
    """The bar's interface when no bar is drawn."""

    def __init__(self, iterable: Iterable | None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", show: bool | None = None):
    """A progress bar over ``iterable`` (or a manual one, advanced with ``update``, when None): tqdm when bars are
    :func:`enabled` and tqdm is installed, else a silent stand-in with the same methods. Usable as a context
    manager."""
    if enabled(show):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _Silent(iterable)
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                    dynamic_ncols=True)
    return _Silent(iterable)
