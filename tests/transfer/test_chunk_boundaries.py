"""Histories at and around chunk boundaries through the GPU path (the deferred fake
copy engine): turn 2 (history read through the engine) and turn 3 (which reuses
what turn 2 saved through the D2H path) equal recompute for every read-ahead
depth, full and sliding attention, and one KV head (MQA).

A one-chunk layer plan once placed K/V as a *view* of the staging slot that the
next layer's refill then overwrote before the cache read it (NaN logits).

Through the `gpu` fixture (tests/conftest.py): on the CPU under the race detector;
with CACHEDATTN_GPU_TESTS=1 also on a card through the native engine, and in bf16
with CACHEDATTN_TEST_DTYPE=bfloat16 (bench/gpu_suite.sh runs both)."""

import pytest
import torch

import cachedattn

from ..hf.models import VOCAB

C = 16
LENGTHS = [C - 1, C, C + 1, 2 * C, 3 * C, 3 * C + 5]
NEW = 5
MODELS = {
    "full": ("llama", {}),
    "sliding": ("mistral", dict(sliding_window=20)),  # windows of one and two chunks
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "mqa_sliding": ("gemma3_text", {}),  # one KV head, sliding and full layers
}


@pytest.fixture
def store(tmp_path):
    s = cachedattn.AttentionStore(host_bytes=32 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=C, hugepages="off")
    yield s
    s.close()


def three_turns(model, conv: str, history: int, gpu):
    """Turn 1 stores `history` tokens, turns 2 and 3 each add NEW; returns each later turn's
    (reused tokens, max |logits - recompute| over the tolerance of gpu's dtype)."""
    ids = gpu.ids(torch.randint(1, VOCAB, (1, history + 2 * NEW), generator=torch.Generator().manual_seed(history)))
    out = []
    with torch.no_grad():
        for n in (history, history + NEW, history + 2 * NEW):
            with cachedattn.session(model, conv) as s:
                got = model(ids[:, :n]).logits.float()
            ref = model(ids[:, :n]).logits[:, -got.shape[1] :].float()
            out.append((s.reused_tokens, (got - ref).abs().max().item() / gpu.tolerance(ref)))
    return out[1:]


@pytest.mark.parametrize("readahead", [1, 2, None])
@pytest.mark.parametrize("kind", list(MODELS))
def test_histories_around_chunk_boundaries_equal_recompute(kind, readahead, store, gpu):
    arch, overrides = MODELS[kind]
    model = cachedattn.patch(gpu.model(arch, **overrides), store, readahead=readahead)
    wrong = {}
    for history in LENGTHS:  # one model per case: each length is its own conversation
        (r2, d2), (r3, d3) = three_turns(model, f"c{history}", history, gpu)
        if (r2, r3) != (history, history + NEW) or not (d2 <= 1 and d3 <= 1):
            wrong[history] = (r2, d2, r3, d3)
    assert model._cachedattn.gpu is not None  # the GPU branch ran
    assert not wrong, wrong  # history length -> (reused, diff) of turns 2 and 3
