import numpy as np
import pytest
import torch

from .conftest import SPEC, assert_kv_equal, make_kv, read_all


def test_lookup_partial_matches(make_store, tokens):
    s = make_store()
    s.append("a", tokens[:100], make_kv(SPEC, 100, 1)).result()
    assert s.lookup("a", tokens[:100]) == 100
    assert s.lookup("a", tokens[:40]) == 40  # a shorter query
    assert s.lookup("a", tokens) == 100  # a longer one: history plus new tokens
    assert s.lookup("a", tokens[:0]) == 0
    assert s.lookup("nobody", tokens) == 0
    assert s.lookup("a", torch.as_tensor(tokens[None, :100])) == 100  # [1, n] tensors too


@pytest.mark.parametrize("diverge_at", [0, 5, 16, 37, 99])
def test_divergence_mid_chunk(make_store, tokens, diverge_at):
    s = make_store()
    kv = make_kv(SPEC, 100, 2)
    s.append("a", tokens[:100], kv).result()
    other = tokens[:120].copy()
    other[diverge_at] = (other[diverge_at] + 1) % 32000
    assert s.lookup("a", other) == diverge_at
    # Store the diverged continuation: the stored tail is replaced.
    kv_new = make_kv(SPEC, 120 - diverge_at, 3)
    s.append("a", other, kv_new, start=diverge_at).result()
    assert s.lookup("a", other) == 120
    assert s.lookup("a", tokens[:100]) == diverge_at
    want = [(torch.cat([k[:, :diverge_at], nk], 1), torch.cat([v[:, :diverge_at], nv], 1)) for (k, v), (nk, nv) in zip(kv, kv_new)]
    assert_kv_equal(read_all(s, "a", 120), want)
    s.flush()
    s.close()
    s2 = type(s)(config=s.config, spec=SPEC)
    assert s2.lookup("a", other) == 120
    assert_kv_equal(read_all(s2, "a", 120), want)
    s2.close()


def test_append_needs_the_stored_prefix(make_store, tokens):
    s = make_store()
    s.append("a", tokens[:50], make_kv(SPEC, 50, 1)).result()
    with pytest.raises(ValueError, match=r"only the first 50"):
        s.begin_append("a", tokens[:80], start=60)
    with pytest.raises(ValueError, match="start"):
        s.begin_append("a", tokens[:80], start=81)


def test_truncating_append_shortens_history(make_store, tokens):
    s = make_store()
    kv = make_kv(SPEC, 100, 1)
    s.append("a", tokens[:100], kv).result()
    s.append("a", tokens[:30], make_kv(SPEC, 0, 0), start=30).result()
    assert s.lookup("a", tokens) == 30
    assert_kv_equal(read_all(s, "a", 30), kv, upto=30)


def test_one_append_at_a_time_per_conversation(make_store, tokens):
    s = make_store()
    t1 = s.begin_append("a", tokens[:10], 0)
    with pytest.raises(ValueError, match="in progress"):
        s.begin_append("a", tokens[:10], 0)
    t1.abort()
    assert "a" not in s  # an aborted first append leaves nothing behind
    with s.begin_append("a", tokens[:10], 0) as t2:
        with pytest.raises(ValueError, match="layers"):
            t2.commit()
        t2.put(make_kv(SPEC, 10, 1))
    # The failed commit closed nothing; leaving the block without commit aborts.
    assert s.lookup("a", tokens) == 0


def test_uncommitted_layers_are_invisible(make_store, tokens):
    s = make_store()
    kv = make_kv(SPEC, 40, 1)
    s.append("a", tokens[:20], [(k[:, :20], v[:, :20]) for k, v in kv]).result()
    txn = s.begin_append("a", tokens[:40], 20)
    txn.put_layer(0, kv[0][0][:, 20:], kv[0][1][:, 20:])
    assert s.lookup("a", tokens) == 20
    for layer in (1, 2):
        txn.put_layer(layer, kv[layer][0][:, 20:], kv[layer][1][:, 20:])
    txn.commit().result()
    assert s.lookup("a", tokens) == 40
    assert_kv_equal(read_all(s, "a", 40), kv)


def test_keys_are_deterministic_across_processes(make_store, tokens, tmp_path):
    import subprocess
    import sys

    from cachedattn.store import keys

    code = (
        "import numpy as np;from cachedattn.store import keys;"
        "print(keys.chunk_key(keys.root_key('fp','c/1'), np.arange(40)).hex(), keys.conversation_dirname('c/1'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [keys.chunk_key(keys.root_key("fp", "c/1"), np.arange(40)).hex(), keys.conversation_dirname("c/1")]
