"""`python -m cachedattn demo`: a multi-turn conversation on a small model
built from a config (random weights, no download), served turn by turn with
cachedattn and, for comparison, by recomputing the whole history.

Per turn it prints the history length, the tokens reused from the store, and
the time to first token both ways (measured on this machine; both paths run
the same model in the same process).
"""

from __future__ import annotations

import tempfile
import time

import torch
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM

import cachedattn
from cachedattn.console import print_table, say

DEFAULT_MODEL = dict(
    model_type="llama",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=16384,
)


def load_local_model(path: str, device: str = "cpu", dtype: str | None = None):
    """A causal LM from a local directory (no download), in eval mode on `device`."""
    import os

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a directory (models are loaded locally, never downloaded)")
    kw = {"dtype": getattr(torch, dtype)} if dtype else {}
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw).to(device).eval()


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(DEFAULT_MODEL)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def run(turns: int, user_tokens: int, answer_tokens: int, directory: str | None, host_mb: int) -> list[dict]:
    model = small_model()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(dir=directory, prefix="cachedattn-demo-") as tmp:
        store = cachedattn.AttentionStore(host_bytes=host_mb << 20, disk_dir=tmp, disk_bytes=8 << 30, chunk_tokens=256)
        cachedattn.patch(model, store)
        history = torch.zeros(1, 0, dtype=torch.long)
        table = Table(title=f"{turns}-turn conversation, {model.config.num_hidden_layers}-layer llama (random weights)")
        for col in ("turn", "history", "reused", "computed", "TTFT cachedattn", "TTFT recompute", "speed-up"):
            table.add_column(col, justify="right")
        with torch.no_grad():
            for t in range(turns):
                full = torch.cat([history, torch.randint(1, vocab, (1, user_tokens), generator=g)], 1)
                with cachedattn.session(model, "demo") as s:
                    out = model.generate(full, max_new_tokens=answer_tokens, do_sample=False, pad_token_id=0)
                t0 = time.perf_counter()
                model.generate(full, max_new_tokens=1, do_sample=False, pad_token_id=0)  # recompute: prefill only
                ttft_re = time.perf_counter() - t0
                rows.append(
                    dict(turn=t + 1, history=history.shape[1], reused=s.reused_tokens, computed=s.computed_tokens,
                         ttft_ca=s.ttft, ttft_re=ttft_re)
                )
                table.add_row(str(t + 1), str(history.shape[1]), str(s.reused_tokens), str(s.computed_tokens),
                              f"{s.ttft * 1e3:.1f} ms", f"{ttft_re * 1e3:.1f} ms", f"{ttft_re / s.ttft:.1f}x")
                history = out
        store.flush()
        st = store.stats()
        store.close()
    print_table(table)
    say(
        f"store: {st['tokens_stored']} tokens stored, {st['tokens_reused']} reused; "
        f"chunks from host {st['host']['hits']}, from disk {st['disk']['hits']}; "
        f"{st['disk']['bytes_written'] / 1e6:.1f} MB written to disk"
    )
    return rows
