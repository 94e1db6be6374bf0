"""One progress bar style for every long job (rich)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator["Bar"]:
    """Yield an object with ``advance(n=1, **fields)``; fields show after the bar (loss, ε...)."""
    if not enabled:
        yield Bar(None, None)
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=not sys.stderr.isatty(),
        disable=not enabled,
    )
    with prog:
        task = prog.add_task(description, total=total, info="")
        yield Bar(prog, task)


class Bar:
    def __init__(self, prog, task):
        self._prog, self._task = prog, task

    def advance(self, n: int = 1, **fields) -> None:
        if self._prog is None:
            return
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._prog.update(self._task, advance=n, info=info)
