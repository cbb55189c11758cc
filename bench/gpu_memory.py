"""Peak GPU memory of one cached turn by read-ahead (issue 12's third figure).

Model: Llama-3.1-8B's attention shape (hidden 4096, 32 heads, 8 KV heads,
head_dim 128, 32 layers) with a small MLP (1024) and vocab (1024), so the
weights are ~3 GB bf16 and what changes with read-ahead is visible: the
staging slots (one layer's history per slot, read-ahead slots), the layers'
restored K/V and the forward's activations. For each H in the grid, a first
turn stores H tokens; then per read-ahead (1, 2, 4, all) a cached turn of 16
new tokens runs after ``torch.cuda.reset_peak_memory_stats()``; reported: peak
allocated minus the allocation before the turn, and the loader's staging bytes.

    python3 bench/gpu_memory.py --out out/memory.json           # on a GPU
    CACHEDATTN_MEM_DRY=cpu python3 bench/gpu_memory.py           # CPU dry run: tiny llama, the fake engine

The dry run measures nothing of a GPU (no peak on the CPU): it proves the script
and reports the staging bytes only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import cachedattn
from cachedattn.transfer.factory import FAKE_ENV


def build(dry: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if dry:
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(cfg).eval(), torch.device("cpu")
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, torch_dtype="bfloat16")
    dev = torch.device("cuda")
    with dev:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model, dev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", default=None, help="history lengths, comma separated")
    args = ap.parse_args(argv)
    dry = os.environ.get("CACHEDATTN_MEM_DRY", "") == "cpu"
    if dry:
        os.environ[FAKE_ENV] = "1"
    elif not torch.cuda.is_available():
        print("no GPU (CACHEDATTN_MEM_DRY=cpu runs the dry path)")
        return 1
    grid = [int(h) for h in (args.grid or ("64,128" if dry else "1024,4096,16384")).split(",")]
    model, dev = build(dry)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for h in grid:
            # None: the bounded default (gpu_load.STAGED_LAYERS slots); the layer count: every layer ("all")
            for readahead in (1, 2, 4, None, model.config.num_hidden_layers):
                store = cachedattn.AttentionStore(host_bytes=(h * 4096 * 32 + (64 << 20)) if not dry else 32 << 20,
                                                  disk_dir=os.path.join(tmp, f"kv{h}-{readahead}"), hugepages="off")
                cachedattn.patch(model, store, readahead=readahead)
                ids = torch.randint(1, model.config.vocab_size, (1, h + 16), device=dev)
                with cachedattn.session(model, "m"):
                    model(ids[:, :h], logits_to_keep=1)
                model._cachedattn.saver.wait("m")
                if not dry:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t = time.perf_counter()
                with cachedattn.session(model, "m") as s:
                    model(ids, logits_to_keep=1)
                if not dry:
                    torch.cuda.synchronize()
                row = dict(history=h, readahead="default" if readahead is None else readahead, reused=s.reused_tokens,
                           turn_ms=round((time.perf_counter() - t) * 1e3, 2),
                           staging_mb=round(model._cachedattn.gpu.staged_bytes() / 2**20, 2))
                if not dry:
                    row["peak_over_start_mb"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                cachedattn.unpatch(model)
                store.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"suite": "gpu_memory", "dry": dry, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
