"""Per-row hooks of a batched session: each row's streamer, stopping criteria, logits
processors and answer bound give what the conversation alone gives with the same hooks."""

import pytest
import torch

import cachedattn

from .models import VOCAB, tiny_model

GEN = 8


class Recorder:
    """A streamer that keeps what it is handed, as generate() hands it."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        assert self.ends == 0, "a token after end()"
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1


class StopAfter:
    """Stops once `k` tokens follow the prompt; keeps the ids it was shown."""

    def __init__(self, prompt_len, k):
        self.prompt_len, self.k, self.seen = prompt_len, k, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.tolist())
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.k, dtype=torch.bool)


class BanBest:
    """Bans the best token at every step (so the row's answer differs from plain greedy); keeps the ids it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.tolist())
        return scores.scatter(-1, scores.argmax(-1, keepdim=True), float("-inf"))


def _hooks(prompts):
    """Row 0: streamer only; row 1: stops after 3 tokens; row 2: its own processor, bound 5; row 3: none."""
    return ([Recorder(), Recorder(), Recorder(), None],
            [None, StopAfter(prompts[1].numel(), 3), None, None],
            [None, None, [BanBest()], None],
            [GEN, GEN, 5, GEN])


def _alone(model, conv, ids, streamer, stop, procs, bound, eos):
    with cachedattn.session(model, conv):
        out = model.generate(ids[None], max_new_tokens=bound, do_sample=False, pad_token_id=0, eos_token_id=eos,
                             streamer=streamer, stopping_criteria=[stop] if stop else None,
                             logits_processor=procs or None)
    g = out[0, ids.numel():]
    hit = [i + 1 for i, t in enumerate(g.tolist()) if t == eos]
    return g[: hit[0]] if hit else g


def test_batch_rows_stream_stop_and_process_like_alone(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (6, 19, 11, 30)]
    with torch.no_grad():
        # An eos that row 3 meets after 2 tokens alone: one row ends on eos while the others go on.
        eos = int(_alone(model, "probe", prompts[3], None, None, None, GEN, None)[1])
        want_streams, want_stops, want_procs, bounds = _hooks(prompts)
        want = [_alone(model, f"alone{r}", x, s, c, p, b, eos)
                for r, (x, s, c, p, b) in enumerate(zip(prompts, want_streams, want_stops, want_procs, bounds))]
        streams, stops, procs, bounds = _hooks(prompts)
        bs = cachedattn.batch_session(model, ["b0", "b1", "b2", "b3"])
        gens = bs.generate(prompts, max_new_tokens=bounds, do_sample=False, pad_token_id=0, eos_token_id=eos,
                           row_streamers=streams, row_stopping_criteria=stops, row_logits_processors=procs)
    for r in range(4):
        assert torch.equal(gens[r], want[r]), (r, gens[r], want[r])
        assert bs.rows[r].generated_tokens == want[r].numel()
    assert [w.numel() for w in want] == [GEN, 3, 5, 2]  # each row stopped by what it holds: bound, criterion, eos
    for r in range(3):  # the prompt first, then each token as a 1-element tensor, then end() once
        assert streams[r].puts == want_streams[r].puts and streams[r].ends == 1, r
        assert streams[r].puts[0] == [prompts[r].tolist()]
    assert stops[1].seen == want_stops[1].seen  # the row's own ids, no padding holes
    assert procs[2][0].seen == want_procs[2][0].seen
    assert bs.streamed == [True, True, True, False]


def test_batch_rows_are_stored_up_to_their_own_end(make_store):
    """A row stopped early stores its turn as far as it went, and its next turn reuses it."""
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    prompts = [torch.arange(1, 21), torch.arange(30, 43)]
    with torch.no_grad():
        bs = cachedattn.batch_session(model, ["s0", "s1"])
        gens = bs.generate(prompts, max_new_tokens=GEN, do_sample=False, pad_token_id=0,
                           row_stopping_criteria=[StopAfter(20, 2), None])
        assert [x.numel() for x in gens] == [2, GEN]
        turn = torch.cat([prompts[0], gens[0]])
        load = store.load_prefix("s0", turn)
        # Both tokens went through the model (the batch went on), so the whole turn is stored, as recompute gives it.
        assert load is not None and load.n_tokens == turn.numel()
        pkv = model(turn[None], use_cache=True).past_key_values
        for layer in range(len(pkv.layers)):
            k, v = load.read_layer(layer)
            assert (k - pkv.layers[layer].keys[0]).abs().max() <= 1e-4, layer
            assert (v - pkv.layers[layer].values[0]).abs().max() <= 1e-4, layer
        load.close()
        nxt = torch.cat([turn, torch.tensor([5, 6])])
        with cachedattn.session(model, "s0") as s:
            out = model.generate(nxt[None], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert s.reused_tokens == turn.numel()
        assert torch.equal(out, model.generate(nxt[None], max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_bad_row_hooks_are_refused_by_name(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    bs = cachedattn.batch_session(model, ["a", "b"])
    ids = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    with pytest.raises(ValueError, match="row_streamers"):
        bs.generate(ids, max_new_tokens=2, row_streamers=[Recorder()])
    with pytest.raises(ValueError, match="row_logits_processors"):
        bs.generate(ids, max_new_tokens=2, row_logits_processors=[None, 3])
    with pytest.raises(ValueError, match="max_new_tokens"):
        bs.generate(ids, max_new_tokens=[2])
    with pytest.raises(ValueError, match="row_streamers"):  # a shared streamer would mix the rows
        bs.generate(ids, max_new_tokens=2, streamer=Recorder())
