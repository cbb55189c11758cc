"""The store's public event counter that the model integration reports through (not its private stats)."""

import pytest


def test_count_adds_to_stats_and_refuses_unknown_events(make_store):
    store = make_store()
    store.count("skipped_saves")
    store.count("recovered_turns", 3)
    s = store.stats()
    assert s["skipped_saves"] == 1 and s["recovered_turns"] == 3
    with pytest.raises(ValueError, match="unknown event 'lookups'"):
        store.count("lookups")
    with pytest.raises(ValueError, match="n must be"):
        store.count("skipped_saves", -1)
