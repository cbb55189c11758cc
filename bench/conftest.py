"""Shared set-up for the benchmark suites (run: python3 -m pytest bench)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cachedattn import native  # noqa: E402

_RESULTS: list[dict] = []


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    """Scratch space on a real disk (not tmpfs): CACHEDATTN_BENCH_DIR or /var/tmp."""
    base = os.environ.get("CACHEDATTN_BENCH_DIR", "/var/tmp")
    d = Path(base) / f"cachedattn-bench-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def report():
    """Rows for the summary table printed at the end of the run."""
    return _RESULTS


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    cols = list(dict.fromkeys(k for row in _RESULTS for k in row))
    cells = [[f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols] for row in _RESULTS]
    title = "cachedattn benchmark summary (measured side by side in this run)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the GPU image has no rich: plain columns
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        terminalreporter.write_line(title)
        for r in [cols, *cells]:
            terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    else:
        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="right" if c not in ("suite", "case") else "left")
        for r in cells:
            table.add_row(*r)
        Console(file=sys.stdout, width=160).print(table)
    out = os.environ.get("CACHEDATTN_BENCH_SUMMARY")
    if out:
        Path(out).write_text(json.dumps({"features": native.features(), "rows": _RESULTS}, indent=2))
