"""The crash test's driver, run as its own process: it imports torch once, then forks
one writer per round and kills it with SIGKILL at a random instant. Each writer first
reopens the store (recovery) and checks every conversation against the log of saves,
then saves turns (extensions rewrite the partial last chunk, regenerations replace a
tail) until it is killed. Prints one JSON line: rounds, failures, where the kills fell.

Log lines (O_APPEND, one write each, so a kill leaves whole lines):
  B conv version parent cut n   a save of tokens(conv, version)[:n] begins
  D conv version n              that save (or a recovered state) is complete
tokens(conv, v) = tokens(conv, parent)[:cut] + fresh tokens of (conv, v).
"""

import json
import os
import random
import signal
import sys
import time
import traceback

import numpy as np
import torch

from cachedattn import AttentionStore
from tests.store.conftest import CHUNK, SPEC
from tests.store.kvtruth import truth_kv

MAXLEN = 320
CONVS = [f"conv-{i}" for i in range(5)]


def fresh(conv: str, v: int) -> np.ndarray:
    return np.random.default_rng([int(conv.split("-")[1]), v]).integers(0, 32000, MAXLEN)


class Log:
    def __init__(self, path: str):
        self.path = path
        self.lineage: dict[tuple[str, int], tuple[int, int]] = {}  # (conv, v) -> (parent, cut)
        self.done: dict[str, tuple[int, int]] = {}  # conv -> (v, n) of its last complete save
        self.pending: dict[str, list[tuple[int, int]]] = {}  # saves begun since then: [(v, n)]
        self.top: dict[str, int] = {}  # highest version used per conversation
        if os.path.exists(path):
            with open(path) as f:
                for line in f.read().splitlines():
                    self._apply(line.split())

    def _apply(self, p: list[str]) -> None:
        if p[0] == "B":
            conv, v, parent, cut, n = p[1], *map(int, p[2:])
            self.lineage[(conv, v)] = (parent, cut)
            self.pending.setdefault(conv, []).append((v, n))
            self.top[conv] = max(self.top.get(conv, 0), v)
        else:
            conv, v, n = p[1], int(p[2]), int(p[3])
            self.done[conv] = (v, n)
            self.pending[conv] = []

    def write(self, *fields) -> None:
        line = " ".join(map(str, fields))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
        self._apply(line.split())

    def tokens(self, conv: str, v: int) -> np.ndarray:
        if v == 0:
            return fresh(conv, 0)
        parent, cut = self.lineage[(conv, v)]
        return np.concatenate([self.tokens(conv, parent)[:cut], fresh(conv, v)])[:MAXLEN]


def open_store(d: str, sync: bool) -> AttentionStore:
    return AttentionStore(host_bytes=4 << 20, disk_dir=d, disk_bytes=1 << 30, chunk_tokens=CHUNK, spec=SPEC,
                          hugepages="off", sync_writes=sync)  # fmt: skip


def verify(s: AttentionStore, log: Log) -> str | None:
    """Every conversation is its last complete save or a newer complete one, exact; logs what it is."""
    for conv in CONVS:
        allowed = ([log.done[conv]] if conv in log.done else [(None, 0)]) + log.pending.get(conv, [])
        stored = s.stored_tokens(conv) if conv in s else np.zeros(0, dtype=np.int64)
        match = next(((v, n) for v, n in allowed if len(stored) == n and (
            n == 0 or np.array_equal(stored, log.tokens(conv, v)[:n]))), None)  # fmt: skip
        if match is None:
            return f"{conv}: {len(stored)} tokens stored, allowed {allowed}"
        if len(stored):
            with s.load(conv, len(stored)) as ld:
                for layer, (wk, wv) in enumerate(truth_kv(stored)):
                    k, v = ld.read_layer(layer)
                    if not (torch.equal(k, wk) and torch.equal(v, wv)):
                        return f"{conv}: layer {layer} differs from recompute"
        if match[0] is not None and log.done.get(conv) != match:
            log.write("D", conv, *match)  # the recovered state is now the one to keep
    return None


def writer(d: str, logpath: str, results: str, seed: int, sync: bool) -> None:
    rng = random.Random(seed)
    log = Log(logpath)
    s = open_store(d, sync)
    why = verify(s, log)
    with open(results, "a") as f:
        f.write(f"FAIL {why}\n" if why else "verified\n")
    if why:
        os._exit(3)
    while True:
        conv = rng.choice(CONVS)
        v, n = log.done.get(conv, (None, 0))
        if v is None or n >= MAXLEN - 40 or rng.random() < 0.2:  # a regenerated answer (or a new conversation)
            parent = v if v is not None else 0
            new_v = log.top.get(conv, 0) + 1 if v is not None else 0
            cut = rng.randrange(0, n + 1) if v is not None else 0
            cut = min(cut, n)
            m = min(MAXLEN, cut + rng.randrange(1, 60))
            log.write("B", conv, new_v, parent, cut, m)
            start = cut
        else:
            new_v, m, start = v, min(MAXLEN, n + rng.randrange(1, 40)), n
            log.write("B", conv, v, *log.lineage.get((conv, v), (0, 0)), m)  # its lineage is unchanged
        toks = log.tokens(conv, new_v)[:m]
        s.append(conv, toks, truth_kv(toks, start), start=start).result()
        log.write("D", conv, new_v, m)


def main() -> None:
    d, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    logpath, results = os.path.join(d, "..", "saves.log"), os.path.join(d, "..", "results.txt")
    rng = random.Random(seed)
    out = {"rounds": 0, "failures": [], "killed_before_verified": 0, "killed_mid_save": 0, "seconds": 0.0}
    t0 = time.monotonic()
    for r in range(rounds + 1):
        last = r == rounds
        with open(results, "a") as f:
            f.write(f"round {r}\n")
        pid = os.fork()
        if pid == 0:
            try:
                if last:  # the final check: recovery and verification, no kill
                    log = Log(logpath)
                    why = verify(open_store(d, False), log)
                    with open(results, "a") as f:
                        f.write(f"FAIL {why}\n" if why else "verified\n")
                    os._exit(3 if why else 0)
                writer(d, logpath, results, seed * 100003 + r, sync=r % 4 == 3)
            except BaseException:
                with open(results, "a") as f:
                    f.write("FAIL " + traceback.format_exc().replace("\n", " | ") + "\n")
                os._exit(1)
            os._exit(0)
        if not last:
            # Small delays land in the reopen and recovery, longer ones in saves and tail rewrites.
            time.sleep(rng.uniform(0, 0.05) if rng.random() < 0.3 else rng.uniform(0.05, 0.5))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with open(results) as f:
            tail = f.read().rsplit(f"round {r}\n", 1)[1]
        if "FAIL" in tail or (last and status != 0):
            out["failures"].append(f"round {r}: {tail.strip()[:2000]}")
            break
        if "verified" not in tail:
            out["killed_before_verified"] += 1
        lines = open(logpath).read().splitlines() if os.path.exists(logpath) else []
        if lines and lines[-1].startswith("B"):
            out["killed_mid_save"] += 1
        out["rounds"] = r + (0 if last else 1)
    out["seconds"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
