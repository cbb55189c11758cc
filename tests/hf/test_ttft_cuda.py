"""TTFT on a GPU waits for the turn's own stream only (defect 7): another job's work queued on
another stream (a preload, a save) is not part of this turn's first token. Skipped without a GPU."""

import pytest
import torch

import cachedattn

from .models import VOCAB, tiny_model

pytestmark = pytest.mark.cuda

SLEEP_S = 1.0


def test_ttft_does_not_wait_for_other_streams(make_store):
    model = tiny_model("llama").cuda()
    cachedattn.patch(model, make_store())
    ids = torch.randint(1, VOCAB, (1, 40), device="cuda")
    other = torch.cuda.Stream()
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(ids[:, :30])  # warm up (kernels, the loader)
        torch.cuda.synchronize()
        with torch.cuda.stream(other):
            torch.cuda._sleep(int(SLEEP_S * 2e9))  # another job's work, ~1 s at 2 GHz
        with cachedattn.session(model, "c") as s:
            model(ids)
    busy = not other.query()
    torch.cuda.synchronize()
    assert busy, "the other stream finished too early for the check to mean anything"
    assert s.ttft < SLEEP_S / 2, s.ttft
