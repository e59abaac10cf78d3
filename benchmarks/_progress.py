"""Progress bars of the main job: one over the sections, one inside the running section.

The outer bar counts expected seconds (each section's estimate for the run's mode), so its
ETA weighs a long section as long; the inner bar counts the section's repeats, epochs or
compiled steps, with its own ETA. Bars go to stderr and switch themselves off when stderr
is not a terminal (CI logs get one line per section instead) or when tqdm is missing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Progress"]


class _NoBar:
    """What a bar is when bars are off: iterates, counts nothing, prints nothing."""

    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: float = 1) -> None:
        pass

    def set_description_str(self, desc: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Progress of one run.

    Args:
        estimates: ``(section name, expected seconds)`` in run order, for the outer bar.
        enabled: ``True``/``False`` forces the bars on or off; ``None`` shows them when stderr
            is a terminal.
        log: print one line per finished section (to stdout) when the bars are off.

    Inside a section: ``for r in progress(range(n), desc="repeats")`` or
    ``bar = progress(total=n, desc=...); bar.update(); bar.close()``.
    """

    def __init__(self, estimates: list[tuple[str, float]] | None = None,
                 enabled: bool | None = None, log: bool = True) -> None:
        try:
            import tqdm
        except ImportError:
            tqdm = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._tqdm = tqdm.tqdm if (tqdm is not None and enabled) else None
        self._log = log
        self._estimates = dict(estimates or [])
        self._outer: Any = _NoBar()
        self._count = len(self._estimates)
        self._done = 0
        if self._tqdm is not None and self._estimates:
            self._outer = self._tqdm(
                total=round(sum(self._estimates.values())), desc="sections", position=0,
                file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc} |{bar}| [{elapsed}<{remaining}]")

    @property
    def bars(self) -> bool:
        return self._tqdm is not None

    def __call__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str | None = None, unit: str = "it") -> Any:
        """A bar inside the running section (a plain iterator when bars are off)."""
        if self._tqdm is None:
            return _NoBar(iterable)
        return self._tqdm(iterable, total=total, desc=desc, unit=unit, position=1,
                          leave=False, file=sys.stderr, dynamic_ncols=True)

    def tick(self, total: int, desc: str) -> Any:
        """A bar of ``total`` steps whose ``update`` a timing loop calls as its callback."""
        return self(total=total, desc=desc)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Run one section under the outer bar; on exit the bar moves by its estimate."""
        self._outer.set_description_str(f"section {self._done + 1}/{self._count}: {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._done += 1
            self._outer.update(round(self._estimates.get(name, 0)))
            self.write(f"[compare] {name}: {time.perf_counter() - t0:.0f} s "
                       f"({self._done}/{self._count})")

    def write(self, message: str) -> None:
        """A line that does not break the bars."""
        if self._tqdm is not None:
            self._tqdm.write(message, file=sys.stderr)
        elif self._log:
            print(message, flush=True)

    def close(self) -> None:
        self._outer.close()
