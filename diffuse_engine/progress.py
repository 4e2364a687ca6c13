"""Progress bars for the long runs (bench, profile, eval, sweep, train).

On a terminal a tqdm bar is drawn on standard error; elsewhere (a log, a pipe, CI) a plain line is printed at every
further 10% and at the end, ``<label>: 120/200 <unit>, 3.1 s``, so that logs show progress without control
characters. ``DIFFUSE_PROGRESS=1`` forces the bars on, ``0`` off; ``--quiet`` / ``--no-progress`` turn them off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO


def enabled(requested: bool | None = None) -> bool:
    """Whether progress is shown: ``requested`` when given, else ``DIFFUSE_PROGRESS``, else whether stderr is a
    terminal."""
    if requested is not None:
        return requested
    env = os.environ.get("DIFFUSE_PROGRESS", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


class Progress:
    """A progress bar for ``total`` items of ``unit``. Advance it with :meth:`update` (relative) or by calling it
    with ``(done, total)`` (absolute); :meth:`message` prints a line above it; :meth:`close` (or leaving the
    ``with`` block) ends it. Disabled, every method does nothing."""

    def __init__(self, label: str, unit: str = "it", stream: TextIO | None = None, *, total: int | None = None,
                 enabled: bool = True) -> None:
        self.label, self.unit, self.enabled, self.total = label, unit, enabled, total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done, self.next_tenth, self.postfix = 0, 1, ""
        self._bar = None

    def _tqdm(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.label, unit=f" {self.unit}", file=self.stream, leave=False,
                             dynamic_ncols=True)
        return self._bar

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        self.done, self.total = done, total if total is not None else self.total
        if self.tty:
            bar = self._tqdm()
            bar.total = self.total
            bar.n = done
            bar.refresh()
        elif self.total and (done >= self.total or 10 * done >= self.next_tenth * self.total):
            suffix = f" {self.postfix}" if self.postfix else ""
            self.stream.write(f"{self.label}: {done}/{self.total} {self.unit}, "
                              f"{time.perf_counter() - self.start:.1f} s{suffix}\n")
            self.stream.flush()
            self.next_tenth = 10 * done // self.total + 1

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` items."""
        self(self.done + n)

    def set_postfix_str(self, text: str) -> None:
        """Text shown after the count (loss, throughput...)."""
        self.postfix = text
        if self.enabled and self.tty:
            self._tqdm().set_postfix_str(text, refresh=False)

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self.tty:
            self._tqdm().write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Erase the bar on a terminal (before other output shows there); the next update redraws it."""
        if self._bar is not None:
            self._bar.clear()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Iterating(Progress):
    def __init__(self, iterable: Iterable, **kw) -> None:
        super().__init__(**kw)
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             show: bool | None = None) -> Progress:
    """A :class:`Progress` for ``total`` items (``len(iterable)`` when it has one), shown when :func:`enabled`
    (``show``). With an ``iterable``, iterating the result yields its items and advances the bar."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    kw = {"label": desc or "progress", "unit": unit, "total": total, "enabled": enabled(show)}
    return _Iterating(iterable, **kw) if iterable is not None else Progress(**kw)
