"""What model identity costs: the full weights digest patch() computes (every
byte of every parameter and buffer, xxh3-128), and the check every turn makes
that the weights are still those (cachedattn.hf.identity).

The model: a llama built from its config on CPU, ~252M fp32 parameters
(~1.0 GB): 16 layers, hidden 1024, MLP 2816, vocab 32000, untied head.

    python3 -m pytest bench/test_identity.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from cachedattn.hf.identity import WeightsIdentity
from cachedattn.hf.weights import model_tensors, weights_digest


@pytest.fixture(scope="module")
def model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _nbytes(model):
    seen = {id(t): t for _, t in model_tensors(model)}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _row(report, benchmark, case, **cols):
    row = {"suite": "identity", "case": case, "seconds": benchmark.stats.stats.median, **cols}
    benchmark.extra_info.update(row)
    report.append(row)


def test_full_weights_digest(benchmark, report, model):
    """What patch() adds, and what a turn after an optimizer step (every tensor written) pays."""
    n = _nbytes(model)
    benchmark.pedantic(weights_digest, args=(model,), rounds=3, iterations=1)
    _row(report, benchmark, f"full digest ({n / 1e9:.2f} GB)", **{"GB/s": n / benchmark.stats.stats.median / 1e9})


def test_xxh3_alone(benchmark, report, model):
    """xxh3-128 over one buffer of the same size: the digest's ceiling on this CPU."""
    n = _nbytes(model)
    buf = np.ones(n, dtype=np.uint8)  # written: zero pages would all map one cached page
    benchmark.pedantic(lambda: xxhash.xxh3_128(buf).digest(), rounds=3, iterations=1)
    _row(report, benchmark, f"xxh3-128 alone ({n / 1e9:.2f} GB)", **{"GB/s": n / benchmark.stats.stats.median / 1e9})


def test_per_turn_check_unchanged(benchmark, report, model):
    """Every turn: the signature of every parameter and buffer, compared."""
    ident = WeightsIdentity(model)
    benchmark.pedantic(ident.check, args=(model,), rounds=200, iterations=1)
    _row(report, benchmark, f"per-turn check, nothing written ({len(model_tensors(model))} tensors)")


def test_per_turn_check_one_tensor_written(benchmark, report, model):
    """A turn after one MLP matrix (11.5 MB) was written in place: that tensor alone is hashed again."""
    ident = WeightsIdentity(model)
    p = model.model.layers[3].mlp.down_proj.weight

    def write():
        with torch.no_grad():
            p.mul_(1.0)
        return (model,), {}

    benchmark.pedantic(ident.check, setup=write, rounds=50, iterations=1)
    _row(report, benchmark, "per-turn check, one 11.5 MB matrix written")
