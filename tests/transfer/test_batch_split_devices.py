"""A batch over a model split over two (simulated) devices, under the race detector: each layer's
padded cache lives on that layer's device, as a single session's does, and each row's history is
loaded through that device's engine and streams. The batch used to put every layer's cache on the
first device, so a layer on the second device mixed devices (a real one raises, as the simulation does)."""

import pytest
import torch

import cachedattn

from ..hf.models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("fake_engine")


def _ids(n, seed):
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("readahead", [1, None])
def test_a_batch_over_layers_on_two_devices_equals_recompute(store, race_detector, readahead):
    det = race_detector
    model = tiny_model("llama")
    det.split_layers(model, [0, 1, 1])
    cachedattn.patch(model, store, readahead=readahead)
    hist = {"a": 37, "b": 16, "c": 70}
    full = {c: _ids(n + 5, 10 + i) for i, (c, n) in enumerate(hist.items())}
    with torch.no_grad():
        for c, n in hist.items():
            with cachedattn.session(model, c):
                model(full[c][None, :n])
            model._cachedattn.saver.wait(c)
        bs = cachedattn.batch_session(model, list(full))
        out = bs.generate(list(full.values()), max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0)
        assert [row.reused_tokens for row in bs.rows] == list(hist.values())
        assert len(set(model._cachedattn.gpu.layer_devices)) == 2  # one engine and staging per device
        for r, c in enumerate(full):
            model._cachedattn.saver.wait(c)
            ref = model.generate(full[c][None], max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, pad_token_id=0)
            torch.testing.assert_close(out.logits[0][r], ref.logits[0][0], atol=1e-4, rtol=0)
            torch.testing.assert_close(out.logits[1][r], ref.logits[1][0], atol=1e-4, rtol=0)
        # the rows' saves (from each layer's own device): a session reuses the whole batch turn
        c = "a"
        nxt = torch.cat([full[c], out.rows[0], _ids(3, 99)])
        with cachedattn.session(model, c) as s:
            logits = model(nxt[None]).logits
        assert s.reused_tokens == hist[c] + 5 + 1  # history, prompt, the first generated token (its KV exists)
        torch.testing.assert_close(logits, model(nxt[None]).logits[:, s.reused_tokens:], atol=1e-4, rtol=0)
