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
