import pytest

from cachedattn.serving.policies import PredictivePolicy, QueueAwarePolicy, QueueView
from cachedattn.store.eviction import make_policy


class FakeEngine:
    """Pushes queue views the way the engine does; the policy never calls back."""

    def __init__(self, queue, disk_window=0):
        self.queue, self.window, self.now, self.seq = queue, disk_window, 0.0, 0

    def push(self, policy):
        self.seq += 1
        policy.on_queue(QueueView(tuple(self.queue), self.window, lambda: self.now, self.seq))


def test_queue_aware_victims_idle_first_then_furthest_back():
    p = QueueAwarePolicy()
    FakeEngine(["c", "a", "c", "e"], disk_window=2).push(p)
    for conv in "abcde":
        p.on_insert(conv)
    # candidates come least recently used first: b was used more recently than d
    assert p.order(list("acdeb"), "host") == ["d", "b", "e", "a", "c"]


def test_queue_aware_never_drops_the_eviction_window_from_disk():
    p = QueueAwarePolicy()
    eng = FakeEngine(["c", "a", "c", "e"], disk_window=2)
    eng.push(p)
    for conv in "abcde":
        p.on_insert(conv)
    assert p.order(list("abcde"), "disk") == ["b", "d", "e"]  # c and a: first two queued jobs
    eng.window = 4
    eng.push(p)
    assert p.order(list("abcde"), "disk") == ["b", "d"]
    assert set(p.order(list("abcde"), "host")) == set("abcde")  # host demotion may touch anyone


def test_unbound_queue_policy_is_lru():
    p = QueueAwarePolicy()
    for conv in "xyz":
        p.on_insert(conv)
    assert p.order(list("yzx"), "disk") == ["y", "z", "x"]  # x used last


def test_policies_are_registered_by_name():
    import cachedattn.serving  # noqa: F401  (registers them)

    assert isinstance(make_policy("queue"), QueueAwarePolicy)
    assert isinstance(make_policy("predictive"), PredictivePolicy)


def test_predictive_ranks_idle_conversations_by_overdue_ratio():
    p = PredictivePolicy()
    eng = FakeEngine([])
    eng.push(p)
    for conv in "fsn":
        p.on_insert(conv)
    # "f" answers quickly (gaps of 10 s), "s" slowly (gaps of 100 s).
    t = 0.0
    for _ in range(4):
        for conv, gap in (("f", 10.0), ("s", 100.0)):
            p.on_finish(conv, t, answer_tokens=50)
            p.on_submit(conv, t + gap)
        t += 200.0
    p.on_finish("f", 1000.0, 50)
    p.on_finish("s", 1000.0, 50)
    p.on_finish("n", 1000.0, 50)  # one turn, no gap of its own: the global fit
    assert p.expected_gap("f") < p.expected_gap("n") < p.expected_gap("s")
    eng.now = 1040.0  # 40 s after every conversation's last turn
    # f is past its rhythm (probably gone); s is well within its own.
    assert p.order(list("fsn"), "host") == ["f", "n", "s"]
    # LRU would rank by last access only.
    eng.queue = ["f"]
    eng.push(p)
    assert p.order(list("fsn"), "host") == ["n", "s", "f"]  # queued goes last, whatever its rhythm


def test_predictive_uses_answer_length():
    p = PredictivePolicy()
    FakeEngine([]).push(p)
    for i, (answer, gap) in enumerate([(10, 12.0), (100, 30.0), (200, 50.0), (50, 20.0)]):
        conv = f"c{i}"
        p.on_finish(conv, 0.0, answer)
        p.on_submit(conv, gap)
    a, b = p._fit
    assert b == pytest.approx(0.2, rel=0.05) and a == pytest.approx(10.0, rel=0.1)


def test_predictive_without_history_falls_back_to_lru():
    p = PredictivePolicy()
    FakeEngine([]).push(p)
    for conv in "abc":
        p.on_insert(conv)
    assert p.order(list("bca"), "host") == ["b", "c", "a"]  # a used last


def test_predictive_trusts_the_global_fit_when_users_are_alike():
    p = PredictivePolicy()
    FakeEngine([]).push(p)
    t = 0.0
    for rnd in range(4):
        for i in range(6):  # every conversation alternates short and long gaps the same way
            conv = f"c{i}"
            p.on_finish(conv, t, 100)
            p.on_submit(conv, t + (5.0 if rnd % 2 else 15.0))
        t += 100.0
    for i in range(6):
        p.on_finish(f"c{i}", t, 100)
    assert p._between == 0.0
    assert len({round(p.expected_gap(f"c{i}"), 9) for i in range(6)}) == 1


def test_predictive_ignores_an_answer_length_slope_that_is_noise():
    p = PredictivePolicy()
    FakeEngine([]).push(p)
    for i, (answer, gap) in enumerate([(10, 20.0), (200, 21.0), (50, 19.0), (120, 20.0), (30, 22.0), (180, 18.5),
                                       (90, 21.5), (160, 19.5)]):
        p.on_finish(f"c{i}", 0.0, answer)
        p.on_submit(f"c{i}", gap)
    assert p._fit[1] == 0.0 and p._fit[0] == pytest.approx(20.19, abs=0.01)


def test_a_view_older_than_the_one_held_is_ignored():
    p = QueueAwarePolicy()
    for conv in "ab":
        p.on_insert(conv)
    p.on_queue(QueueView(("a",), 1, None, seq=2))
    p.on_queue(QueueView(("b",), 1, None, seq=1))  # pushed earlier, arrived later
    assert p.order(["a", "b"], "disk") == ["b"]
