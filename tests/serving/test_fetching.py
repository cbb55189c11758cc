from cachedattn.serving.fetching import plan_prefetch, window_size


def test_window_is_capacity_over_mean_kv():
    assert window_size(1000, 100.0) == 10
    assert window_size(1000, 300.0) == 3
    assert window_size(1000, 0.0) == 0


def test_plan_respects_budget_and_queue_order():
    window = ["a", "b", "a", "c", "d"]
    disk = {"a": 40, "b": 0, "c": 50, "d": 10}
    # b is already in memory; a fits; c does not fit in 100 - 30 - 40 = 30: stop there (d does not jump ahead).
    assert plan_prefetch(window, disk, free_bytes=100, keep_free=30) == ["a"]
    assert plan_prefetch(window, disk, free_bytes=200, keep_free=30) == ["a", "c", "d"]
    assert plan_prefetch(window, disk, free_bytes=30, keep_free=30) == []


def test_plan_never_exceeds_the_budget_on_random_queues():
    import random

    rng = random.Random(0)
    for _ in range(500):
        convs = [f"c{i}" for i in range(10)]
        disk = {c: rng.choice([0, rng.randint(1, 100)]) for c in convs}
        window = [rng.choice(convs) for _ in range(rng.randint(0, 15))]
        free, keep = rng.randint(0, 400), rng.randint(0, 100)
        picks = plan_prefetch(window, disk, free, keep)
        assert sum(disk[c] for c in picks) <= max(0, free - keep)
        assert len(picks) == len(set(picks)) and all(disk[c] > 0 for c in picks)
        order = list(dict.fromkeys(window))
        assert [order.index(c) for c in picks] == sorted(order.index(c) for c in picks)


class FakeStore:
    """Host memory of 100 bytes; making room drops conversation 'b' from disk (as a demotion's write can)."""

    def __init__(self):
        self.disk = {"a": 30, "b": 30, "c": 30}
        self.free = 20
        self.prefetched = []

    def residency(self, conv):
        return {"disk_only_bytes": self.disk.get(conv, 0)}

    def host_free_bytes(self):
        return self.free

    def make_host_room(self, nbytes, protect=frozenset()):
        assert {"a", "b", "c"} <= set(protect)
        self.free = 100
        del self.disk["b"]

    def prefetch(self, conv):
        if conv not in self.disk:
            raise KeyError(conv)
        self.prefetched.append(conv)
        return conv


def test_prefetch_window_skips_what_making_room_dropped():
    from cachedattn.serving.fetching import prefetch_window

    s = FakeStore()
    assert prefetch_window(s, ["a", "b", "a", "c", "run"], "run", running_need=10) == ["a", "c"]
    assert s.prefetched == ["a", "c"]
