"""Progress bars on stderr for the long phases (statistics pass, factorizations, search, benchmarks).

A run from a terminal shows them; with --quiet, from a script, or through the API by default it shows
nothing: `Progress(False)` hands out callbacks that do nothing, so the pipeline calls them unconditionally.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Advance = Callable[[int], None]


def ignore(count: int = 1) -> None:
    """What advances no bar."""
    return None


class Progress:
    """One bar per phase, each removed when the run ends (the summary tables follow)."""

    def __init__(self, enabled: bool):
        self._bars = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self._bars = Bars(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(file=sys.stderr), transient=True,
            )

    def __enter__(self) -> Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.stop()

    def phase(self, description: str, total: int | None = None) -> Advance:
        """A new bar (total None: a counter with no end known); returns what advances it."""
        if self._bars is None:
            return ignore
        bars = self._bars
        task = bars.add_task(description, total=total)

        def advance(count: int = 1) -> None:
            bars.advance(task, count)

        return advance


def terminal_progress(quiet: bool) -> bool:
    """Whether the command line should draw bars: not when quiet or when stderr is not a terminal."""
    return not quiet and sys.stderr.isatty()
