"""The store stands alone: it imports nothing of cachedattn.serving or cachedattn.hf, its
modules import each other without a cycle (lazy imports included), and its locks are
taken in one written order (lock_order.py; the debug mode raises otherwise)."""

import ast
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cachedattn.store import lock_order

STORE = Path(__file__).resolve().parents[2] / "cachedattn" / "store"


def _imports(path: Path) -> set[str]:
    """Every cachedattn module a store module imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cachedattn"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cachedattn"))
    return out


def test_the_store_imports_nothing_of_serving_or_hf_and_has_no_import_cycle():
    mods = {p.stem: _imports(p) for p in STORE.glob("*.py") if p.stem != "__init__"}
    for name, imps in mods.items():
        bad = sorted(i for i in imps if i.startswith(("cachedattn.serving", "cachedattn.hf")))
        assert not bad, f"cachedattn.store.{name} imports {bad}"
    graph = {
        n: {i.rsplit(".", 1)[-1] for i in imps if i.startswith("cachedattn.store.") and i.rsplit(".", 1)[-1] in mods}
        for n, imps in mods.items()
    }
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in graph[n]:
            visit(m, path + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])


def test_a_store_with_a_queue_policy_runs_without_serving_loaded(tmp_path):
    code = (
        "import sys, torch, numpy as np\n"
        "from cachedattn.store import AttentionStore, KVSpec\n"
        "spec = KVSpec.uniform(2, 1, 4, torch.float32, 'm')\n"
        f"s = AttentionStore(host_bytes=1 << 20, disk_dir={str(tmp_path)!r}, chunk_tokens=4, spec=spec, "
        "eviction='predictive', hugepages='off')\n"
        "kv = [(torch.zeros(1, 6, 4), torch.zeros(1, 6, 4))] * 2\n"
        "s.append('a', np.arange(6), kv).result(); s.demote('a'); s.make_host_room(1 << 30)\n"
        "s.load('a', 6).close(); s.close()\n"
        "loaded = [m for m in sys.modules if m.startswith(('cachedattn.serving', 'cachedattn.hf', 'transformers'))]\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_locks_taken_out_of_order_raise_in_the_debug_mode(make_store):
    s = make_store()
    with s._index.lock:
        with s._host.cond:  # store -> host pool: in order
            pass
    with s._host.cond:
        with pytest.raises(lock_order.LockOrderError, match="store .* while holding host pool"):
            with s._index.lock:
                pass
    with s._index.lock:  # the store re-enters its own lock
        with s._index.lock:
            assert s.conversations() == []


def test_no_engine_lock_is_taken_under_the_store_lock(make_store):
    """What the queue-aware policy used to do (ask the engine for its queue while the store
    evicts) is refused: the engine's queue lock comes before the store's."""
    s = make_store()
    engine_queue = threading.Condition(lock_order.ordered(threading.Lock(), lock_order.ENGINE, "engine queue"))
    with engine_queue:
        pass
    with s._index.lock:
        with pytest.raises(lock_order.LockOrderError, match="engine queue"):
            with engine_queue:
                pass


def test_a_condition_wait_keeps_the_order_bookkeeping(make_store):
    s = make_store()
    with s._index.lock:
        s._index.cond.wait(timeout=0.01)  # releases every level of the store lock, then takes it back
        with s._host.cond:
            pass
    with s._host.cond:  # nothing left held by the wait
        pass
