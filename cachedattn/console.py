"""Output that reads anywhere: rich on a terminal, plain text in a pipe or a log.

rich falls back to 80 columns when stdout is not a terminal and cuts table
cells with "…" to fit, and its progress bar redraws one line that a log
keeps only at the end. So when stdout is not a terminal, tables are printed
as GitHub Markdown (every cell whole) and progress as a plain line every few
seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterable, Iterator

from rich.console import Console
from rich.table import Table

PROGRESS_EVERY_S = 5.0  # seconds between two plain progress lines


def is_terminal() -> bool:
    return sys.stdout.isatty()


def markdown(table: Table) -> str:
    """The table as GitHub Markdown, its title in bold above it."""
    cols = [str(c.header) for c in table.columns]
    cells = [list(c._cells) for c in table.columns]
    lines = [f"**{table.title}**", ""] if table.title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i in range(len(cells[0]) if cells else 0):
        lines.append("| " + " | ".join(str(col[i]).replace("|", "/") for col in cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(table: Table) -> None:
    if is_terminal():
        Console().print(table)
    else:
        print(markdown(table), flush=True)


def say(text: str) -> None:
    """One line of status: rich markup on a terminal, plain (flushed) text elsewhere."""
    if is_terminal():
        Console().print(text)
    else:
        print(Console().render_str(text).plain, flush=True)


class Progress:
    """`with Progress(total, "replay") as p: ... p.advance()`: a rich bar on a terminal;
    elsewhere `label: done/total (pct), elapsed, ~left` every PROGRESS_EVERY_S seconds and at the end."""

    def __init__(self, total: int, description: str, unit: str = "", every_s: float = PROGRESS_EVERY_S):
        self.total, self.description, self.unit, self.every_s = total, description, unit, every_s
        self.done = 0
        self._bar = None
        self._first = (0.0, 0)  # time and count of the first step
        self._printed = -1  # the count the last plain line showed

    def __enter__(self) -> "Progress":
        self._t0 = self._last = time.monotonic()
        if is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def describe(self, description: str) -> None:
        self.description = description
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def advance(self, n: int = 1) -> None:
        if self.done == 0:
            self._first = (time.monotonic(), n)  # the rate is taken after the first step, which carries any set-up
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self._printed = self.done
        elapsed = now - self._t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.done < self.total and self.done > self._first[1]:
            rate = (self.done - self._first[1]) / (now - self._first[0])
            left = f", ~{duration((self.total - self.done) / rate)} left"
        unit = f" {self.unit}" if self.unit else ""
        print(f"{self.description}: {self.done}/{self.total}{unit}{pct}, {duration(elapsed)} elapsed{left}",
              flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif exc[0] is None and self._printed != self.done:
            self._line(time.monotonic())


def track(items: Iterable, description: str, total: int | None = None, unit: str = "") -> Iterator:
    """Iterates `items` under a Progress."""
    items = list(items) if total is None else items
    with Progress(len(items) if total is None else total, description, unit) as p:
        for x in items:
            yield x
            p.advance()


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def example(command: str) -> dict:
    """argparse keywords that end a command's --help with one example that works as it stands."""
    return dict(epilog=f"example:\n  {command}", formatter_class=argparse.RawDescriptionHelpFormatter)
