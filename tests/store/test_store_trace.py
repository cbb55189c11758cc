"""How much of the store one cached load walks through: the modules and classes
a reader following it meets (measured with sys.setprofile).

Before the index and tier readers (this test on that code): 11 modules / 13
classes from host memory, 14 / 16 from disk. Now 9 / 10 and 13 / 15: a load
meets the store, the index and its plan (LoadPlan, a record: which chunks,
which host copies, the lease), the records it names (Conversation, Chunk,
HostBlock, the geometry), the counters and, from disk, the block pool, the
tier reader and the files it opens. No policy: the index keeps recency itself."""

import pytest

from cachedattn.testing.trace import entered

from .conftest import SPEC, make_kv

# Upper bounds of one cached load (lookup, per-layer reads, close) in cachedattn.store.
BOUNDS = {"host": (9, 10), "disk": (13, 15)}


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_one_cached_load_enters_few_store_modules(make_store, tokens, tier):
    s = make_store()
    s.append("c", tokens[:40], make_kv(SPEC, 40, 1)).result()
    s.flush()
    if tier == "disk":
        s.demote("c")

    def load():
        with s.load_prefix("c", tokens[:48]) as ld:
            assert ld.n_tokens == 40
            assert ld.from_disk == (3 if tier == "disk" else 0)
            for layer in range(SPEC.num_layers):
                ld.read_layer(layer)

    # the lock-order checker is a debug wrapper these tests turn on, not part of the path
    got = entered(load, package="cachedattn.store", skip=("cachedattn.store.lock_order",))
    print(f"\none cached load from {tier}: {got.summary()}")
    for name in sorted(got.classes):
        print("   ", name)
    modules, classes = BOUNDS[tier]
    assert len(got.modules) <= modules and len(got.classes) <= classes, sorted(got.classes)


def test_the_trace_sees_what_a_call_enters():
    from cachedattn.store import keys

    got = entered(lambda: keys.as_token_array([1, 2]), package="cachedattn.store")
    assert got.modules == {"cachedattn.store.keys"} and not got.classes
