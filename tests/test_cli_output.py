"""The commands read the same in a pipe or a log as on a terminal: tables whole (no cell cut with "…" at
rich's 80-column fallback), progress as plain lines, the replay's plan first; every --help ends with an
example the command accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachedattn import native
from cachedattn.console import Progress, markdown

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["demo", "native-demo", "info", "compat", "replay", "serve"]
RICH_DRAWING = re.compile("[…━┃│┏┡└┗]")


def _piped(*args: str, timeout: float = 600) -> str:
    """Runs `python3 -m cachedattn ARGS` with stdout a pipe (not a terminal), as `| tee log` does."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    res = subprocess.run([sys.executable, "-m", "cachedattn", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables in `text`: rows of cells, header first, the |---| line left out."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def _whole(text: str) -> list[list[list[str]]]:
    """Checks that no cell was cut or drawn for a terminal, and that every row has the header's cells."""
    assert not RICH_DRAWING.search(text), f"terminal drawing or a cut cell in piped output:\n{text}"
    tables = _tables(text)
    assert tables, f"no table in:\n{text}"
    for t in tables:
        assert all(len(row) == len(t[0]) for row in t), t
        assert all(cell for row in t[1:] for cell in row), t
    return tables


def test_native_demo_tables_are_whole_in_a_pipe():
    out = _piped("native-demo", "--total-mb", "8", "--block-kb", "1024")
    info, res = _whole(out)
    features = {k: v for k, v in info[1:]}
    reason = native.features()["cuda_reason"] or "-"
    assert features["cuda_reason"] == reason  # the longest cell, whole
    assert [r[0] for r in res[1:]] == ["write + fdatasync", "read (cold cache)"]
    assert "filling blocks: 8/8 blocks (100%)" in out
    assert "every byte read back matches" in out


def test_demo_table_is_whole_in_a_pipe():
    out = _piped("demo", "--turns", "2", "--user-tokens", "24", "--answer-tokens", "4", "--host-mb", "64")
    (table,) = _whole(out)
    assert table[0] == ["turn", "history", "reused", "computed", "TTFT cachedattn", "TTFT recompute", "speed-up"]
    assert [r[0] for r in table[1:]] == ["1", "2"]
    assert all(re.fullmatch(r"\d+\.\d ms", r[4]) and re.fullmatch(r"\d+\.\d ms", r[5]) for r in table[1:])


def test_replay_in_a_pipe_says_its_plan_first_and_prints_what_it_writes(tmp_path):
    out_dir = tmp_path / "res"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cachedattn", "replay", "--conversations", "3", "--max-rounds",
                             "2", "--max-user", "48", "--max-answer", "16", "--systems", "RE,CA", "--out",
                             str(out_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline()
    first_after = time.monotonic() - t0
    rest = proc.stdout.read()
    assert proc.wait(timeout=600) == 0
    # What runs and where its results go, before the trace and the model are built.
    assert first.startswith("cachedattn replay: 2 systems side by side (RE,CA), on 3 multi-turn ShareGPT")
    assert f"results go to {out_dir.resolve()}/" in first
    lines = rest.splitlines()
    assert lines[0].startswith("trace: ") and re.search(r"about \d+ (s|min|h) on this machine \(a warm-up turn",
                                                         lines[0]), lines[0]
    assert first_after < time.monotonic() - t0  # printed before the run, not with the results
    assert re.search(r"^host 10% disk 50%: (\d+)/\1 jobs \(100%\), \d+ (s|min) elapsed$", rest, re.M), rest
    tables = _whole(rest)
    # The printed tables are the Markdown the replay writes, cell for cell.
    assert tables == _tables((out_dir / "table.md").read_text())
    assert [r[0] for r in tables[0][1:]] == ["RE", "CA"]


def test_compat_progress_is_a_plain_line_in_a_pipe():
    out = _piped("compat", "--only", "llama")
    assert "checking architectures: 1/1 architectures (100%)" in out
    (table,) = _whole(out)
    assert table[1][:2] == ["llama", "works"]


def test_progress_prints_a_line_every_few_seconds_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    with Progress(10, "replay", unit="jobs", every_s=5) as p:
        for _ in range(10):
            now[0] += 2.0
            p.advance()
    lines = capsys.readouterr().out.splitlines()
    # after 6 s (3 jobs), 12 s (6 jobs), 18 s (9 jobs), and the end; what is left is rated after the first job
    assert lines == ["replay: 3/10 jobs (30%), 6 s elapsed, ~14 s left",
                     "replay: 6/10 jobs (60%), 12 s elapsed, ~8 s left",
                     "replay: 9/10 jobs (90%), 18 s elapsed, ~2 s left",
                     "replay: 10/10 jobs (100%), 20 s elapsed"]


def test_markdown_keeps_every_cell_whole():
    from rich.table import Table

    t = Table(title="t")
    t.add_column("a")
    t.add_column("b")
    long = "x" * 300
    t.add_row(long, "1|2")
    assert markdown(t).splitlines()[-1] == f"| {long} | 1/2 |"


@pytest.mark.parametrize("command", [""] + COMMANDS)
def test_every_help_ends_with_an_example_the_command_accepts(command):
    args = [command, "--help"] if command else ["--help"]
    text = _piped(*args)
    m = re.search(r"^example:\n  python3 -m cachedattn (.+)$", text, re.M)
    assert m, f"`cachedattn {command} --help` shows no example:\n{text}"
    words = m.group(1).split()
    assert words[0] == (command or words[0]) and words[0] in COMMANDS
    _parse(words)


def _parse(words: list[str]) -> None:
    """The example's arguments, parsed by the command's own parser (argparse exits on any it does not take)."""
    import cachedattn.__main__ as cli

    command, rest = words[0], words[1:]
    if command == "replay":
        from cachedattn.replay import cli as replay

        replay._check(replay.parser().parse_args(rest))
    elif command == "serve":
        from cachedattn.server import cli as serve

        serve.parser().parse_args(rest)
    elif command == "compat":
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        assert words[1] == "--only" and set(words[2:]) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    else:
        args, unknown = cli.parser().parse_known_args(words)
        assert args.command == command and not unknown, unknown
