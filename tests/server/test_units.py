"""The server's parts without HTTP: text release and stop strings, sampling,
conversation identity, end tokens."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cachedattn.server.generation import Sampler, TextStream
from cachedattn.server.errors import APIError
from cachedattn.server.identity import ID_LIMIT, Conversations, explicit_id
from cachedattn.store.keys import MAX_ID_BYTES


def chars(ids):
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stops,pieces,expected", [
    ([], ["ab", "cd"], "abcd"),
    (["cd"], ["ab", "c", "d", "ef"], "ab"),          # a stop split across tokens
    (["xyz"], ["ab", "xy", "q"], "abxyq"),           # a tail that looked like a stop, then was not
    (["b", "c"], ["a", "cb"], "a"),                  # the earliest of several
])
def test_text_stream_releases_final_text_and_ends_before_a_stop(stops, pieces, expected):
    ts = TextStream(chars, stops)
    out = "".join(ts.add([ord(c) for c in p]) for p in pieces) + ts.finish()
    assert out == expected
    assert ts.text == expected


def test_text_stream_holds_a_partial_character_back():
    def decode(ids):  # bytes ids, decoded as a byte-level tokenizer would
        return bytes(ids).decode("utf-8", errors="replace")

    ts = TextStream(decode, [])
    e_acute = "é".encode()
    assert ts.add([ord("a"), e_acute[0]]) == "a"
    assert ts.add([e_acute[1]]) == "é"


def test_sampler_is_reproducible_by_seed_and_top_p_keeps_the_top_token():
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def draws(seed, top_p=1.0):
        s = Sampler(1.0, top_p, seed)
        return [int(s(None, scores).argmax()) for _ in range(20)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert set(draws(5, top_p=1e-6)) == {int(scores.argmax())}


def test_top_k_samples_among_the_k_best_tokens_only():
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    best = scores[0].topk(3).indices.tolist()
    for seed in range(30):
        assert int(Sampler(5.0, 1.0, seed, top_k=1)(None, scores).argmax()) == best[0]
        assert int(Sampler(5.0, 1.0, seed, top_k=3)(None, scores).argmax()) in best
    # -1 and 0 keep every token: the same draws as without top_k.
    for k in (-1, 0, 50, 10**6):
        assert [int(Sampler(5.0, 1.0, s, top_k=k)(None, scores).argmax()) for s in range(10)] == \
            [int(Sampler(5.0, 1.0, s)(None, scores).argmax()) for s in range(10)]


@pytest.mark.parametrize("temperature", [1e-320, 1e-30, 1e-6])
def test_a_tiny_temperature_samples_the_best_token_not_nan(temperature):
    scores = torch.tensor([[3e38, -3e38, 1.0, 3e38 * 0.99]])
    out = Sampler(temperature, 1.0, seed=1)(None, scores)
    assert out.argmax(-1).item() == 0
    assert Sampler(temperature, 0.5, seed=1)(None, scores).argmax(-1).item() == 0


def test_explicit_ids_in_order_of_precedence():
    assert explicit_id({"x-session-id": "s", "x-user-id": "u"}, "c", "v") == "id:s"
    assert explicit_id({"x-user-id": "u"}, "c", "v") == "id:u"
    assert explicit_id({}, "c", "v") == "id:c"
    assert explicit_id({}, None, "v") == "id:v"
    assert explicit_id({}, None, None) is None
    assert explicit_id({"x-session-id": ""}, "c", None) == "id:c"  # an empty header names nothing


def test_a_header_id_is_read_as_utf8_and_counted_in_bytes():
    """Starlette hands header bytes over as Latin-1 characters; the id is what they spell in UTF-8."""
    latin1 = "é".encode().decode("latin-1")
    assert explicit_id({"x-session-id": latin1}, None, None) == explicit_id({}, "é", None) == "id:é"
    assert explicit_id({"x-session-id": latin1 * (ID_LIMIT // 2)}, None, None)
    with pytest.raises(APIError, match=f"{ID_LIMIT + 1} bytes long; the limit is {ID_LIMIT}"):
        explicit_id({"x-session-id": latin1 * (ID_LIMIT // 2) + "ab"}, None, None)
    with pytest.raises(APIError, match="not valid UTF-8") as e:
        explicit_id({"x-user-id": "\xff"}, None, None)
    assert e.value.param == "x-user-id"
    assert ID_LIMIT + len("id:") == MAX_ID_BYTES  # the store's limit, less the prefix


def test_a_continued_turn_keeps_its_generated_token_ids():
    convs = Conversations()
    convs.record("c", "P", "P answer", [1, 2, 3, 4])
    assert convs.find("P answer NEXT", [("P", " answer")]) == "c"
    ids = convs.token_ids("c", "P answer NEXT", lambda t: [99], lambda t: [7] * len(t))
    assert ids == [1, 2, 3, 4] + [7] * len(" NEXT")
    # A rewritten answer: found by its prompt, text encoded whole.
    assert convs.find("P other NEXT", [("P", " other")]) == "c"
    assert convs.token_ids("c", "P other NEXT", lambda t: [99], lambda t: [7]) == [99]


def test_end_tokens_are_the_models_and_the_tokenizers(monkeypatch):
    from cachedattn.server import service

    monkeypatch.setattr(service, "Metrics", lambda store: None)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9], pad_token_id=None))
    tok = SimpleNamespace(eos_token_id=5)
    srv = service.Server(model, None, None, tok, "m", 100)
    assert srv.eos_token_ids == [7, 9, 5] and srv.pad_token_id == 5
    model.generation_config.eos_token_id = 5
    assert service.Server(model, None, None, tok, "m", 100).eos_token_ids == [5]


def test_chat_template_override_and_the_tiny_template(tiny_dir):
    from cachedattn.server.tokenizer import ChatTokenizer

    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTokenizer(tiny_dir).render(msgs) == "<|user|>hi<|end|>\n<|assistant|>"
    assert ChatTokenizer(tiny_dir, "X{{ messages[0]['content'] }}").render(msgs) == "Xhi"


def test_directories_without_what_the_server_reads_are_refused(tmp_path):
    from cachedattn.server import model
    from cachedattn.server.tokenizer import ChatTokenizer

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        model.resolve(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "never downloaded"),
    (["--host-bytes", "lots"], "host_bytes"),
    (["--max-model-len", "999999"], "exceeds the model's"),
])
def test_bad_options_end_the_command_with_one_line(tiny_dir, capsys, args, message):
    from cachedattn.server import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tiny_dir), *args] if args[0] != "--model" else args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--max-batch", "4"], ["--max-batch-tokens", "512"]])
def test_batching_flags_are_refused_under_vllm_by_name(flags):
    """vLLM batches itself: the embedded server's batching flags are refused there, not ignored."""
    from cachedattn.server import cli, vllm_launch

    p = cli.parser()
    args = p.parse_args(["--engine", "vllm", *flags])
    with pytest.raises(ValueError, match=flags[0]):
        vllm_launch.command(args, Path("/nonexistent-model"), "tiny", vars(p.parse_args([])))


def test_serve_refuses_max_batch_below_one_in_one_line(tiny_dir, capsys):
    from cachedattn.server import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tiny_dir), "--max-batch", "0"])
    assert e.value.code == 2 and "max_batch must be an int >= 1" in capsys.readouterr().err
