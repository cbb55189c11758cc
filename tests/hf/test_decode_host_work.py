"""Per-token work in decode stays per token (defect 11): the sliding-window side buffer grows in
place (not re-concatenated each step: O(T^2)), and the ids fed each step are kept where they are
(no copy to the host, hence no host sync, per token) until a save reads them."""

import torch

import cachedattn
from cachedattn.hf.cache import StoreBackedCache

from .models import VOCAB, tiny_model


def _cache(model):
    return StoreBackedCache(model.config, None, 0, [model.config.sliding_window] * model.config.num_hidden_layers)


def test_the_sliding_side_buffer_is_reallocated_logarithmically_often():
    model = tiny_model("mistral", sliding_window=8)
    cache = _cache(model)
    h, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    ptrs, steps = set(), 300
    ks = torch.randn(steps, 1, h, 1, d)
    for t in range(steps):
        cache.update(ks[t], ks[t] * 2, 0)
        ptrs.add(cache._side[0].view()[0].data_ptr())
    assert len(ptrs) <= 12  # doubling: ~log2(300); a cat per step would give 300
    k, v = cache.row_new_kv(0, 0, 0, steps)
    assert torch.equal(k, ks[:, 0, :, 0].permute(1, 0, 2)) and torch.equal(v, 2 * k)


def test_note_tokens_keeps_the_steps_ids_without_a_host_copy(monkeypatch):
    cache = _cache(tiny_model("mistral"))
    ids = torch.randint(1, VOCAB, (2, 40))
    cache.note_tokens(ids[:, :30])
    to_host = []
    real = torch.Tensor.to

    def spy(self, *a, **k):
        if a and str(a[0]) == "cpu" or k.get("device") is not None:
            to_host.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    for t in range(30, 40):  # decode steps
        cache.note_tokens(ids[:, t : t + 1])
    assert to_host == [] and len(cache._tokens) == 11
    monkeypatch.undo()
    assert torch.equal(cache.computed_tokens(), ids)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.computed_tokens(), ids.flip(0))


def test_generate_with_a_sliding_model_still_saves_what_recompute_gives(tmp_path):
    model = tiny_model("mistral", sliding_window=12)
    store = cachedattn.AttentionStore(
        host_bytes=16 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=16, hugepages="off"
    )
    cachedattn.patch(model, store)
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
        nxt = torch.cat([out, ids[:, :3]], 1)
        with cachedattn.session(model, "c") as s:
            got = model(nxt).logits
        ref = model(nxt).logits[:, -got.shape[1] :]
    assert s.reused_tokens == out.shape[1] - 1 or s.reused_tokens == out.shape[1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    store.close()
