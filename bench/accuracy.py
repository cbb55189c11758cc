"""Accuracy of context-window overflow policies (the paper's table), on a
model trained here: no pretrained model can be downloaded.

1. A byte-level BPE tokenizer (4096 tokens) is trained on ShareGPT text.
2. A small Llama-style model (4 layers, hidden 256, 8 heads, 2 KV heads,
   RoPE) is trained on ShareGPT conversations in 512-token blocks for a time
   budget (CACHEDATTN_TRAIN_MINUTES, default 20). Both are cached under
   CACHEDATTN_BENCH_CACHE (default ~/.cache/cachedattn/accuracy) and reused.
3. On held-out conversations: a history of W - 32 tokens is stored, then a
   turn of 96 more tokens overflows the window W = 512, so 256 tokens are
   dropped; perplexity of the 96 new tokens under each policy:
   TT (truncate, recompute the kept window), CA (reuse the stored KV with
   positions re-applied), CA with 4 kept sink tokens, NKVT (reuse the stored
   KV without re-applying positions).

    python3 bench/accuracy.py            # writes bench/results/accuracy.{md,json}
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cachedattn  # noqa: E402
from cachedattn.data import sharegpt  # noqa: E402

CACHE = Path(os.environ.get("CACHEDATTN_BENCH_CACHE", Path.home() / ".cache" / "cachedattn" / "accuracy"))
W, HISTORY, NEW, SEQ, VOCAB = 512, 480, 96, 512, 4096
SPECIALS = ["<|pad|>", "<|user|>", "<|assistant|>"]
console = Console()


def texts() -> tuple[list[str], list[str]]:
    convs = list(sharegpt.conversations())
    random.Random(0).shuffle(convs)
    as_text = ["".join(f"<|{role}|>{msg}\n" for role, msg in c) for c in convs]
    cut = int(len(as_text) * 0.97)
    return as_text[:cut], as_text[cut:]


def tokenizer(train: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = CACHE / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train[:6000], trainer=trainer)
    CACHE.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def new_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                               pad_token_id=0, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg)


def trained_model(tok, train: list[str]):
    from transformers import AutoModelForCausalLM

    path = CACHE / "model"
    if (path / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path).eval(), json.loads((path / "train.json").read_text())
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    ids = [i for t in train for i in tok.encode(t).ids]
    data = torch.tensor(ids[: (len(ids) // SEQ) * SEQ]).view(-1, SEQ)
    model = new_model().train()
    budget = float(os.environ.get("CACHEDATTN_TRAIN_MINUTES", "20")) * 60
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batch, step, t0, losses = 8, 0, time.perf_counter(), []
    with Progress(console=console) as prog:
        task = prog.add_task("training", total=budget)
        while time.perf_counter() - t0 < budget:
            frac = min(1.0, (time.perf_counter() - t0) / budget)
            for g in opt.param_groups:  # warm-up, then cosine decay over the time budget
                g["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            x = data[torch.randint(0, len(data), (batch,))]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            prog.update(task, completed=time.perf_counter() - t0, description=f"training (step {step}, loss {loss.item():.2f})")
    info = {"steps": step, "tokens": step * batch * SEQ, "minutes": budget / 60,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]), "train_tokens_available": int(data.numel())}
    model.save_pretrained(path)
    (path / "train.json").write_text(json.dumps(info, indent=1))
    return model.eval(), info


def evaluate(model, tok, held_out: list[str], n_conv: int) -> dict[str, float]:
    samples = [ids for t in held_out if len(ids := tok.encode(t).ids) >= HISTORY + NEW][:n_conv]
    policies = {"TT (recompute)": dict(position_policy="recompute"), "CA (re-applied)": dict(position_policy="reapply"),
                "CA + 4 sinks": dict(position_policy="reapply", keep_first=4), "NKVT (not re-applied)": dict(position_policy="keep")}
    nll = {p: 0.0 for p in policies}
    count = 0
    with tempfile.TemporaryDirectory() as d:
        store = cachedattn.AttentionStore(host_bytes=512 << 20, disk_dir=d, chunk_tokens=16)
        cachedattn.patch(model, store, max_context=W)
        with Progress(console=console) as prog, torch.no_grad():
            task = prog.add_task("evaluating", total=len(samples) * len(policies))
            for i, ids in enumerate(samples):
                x = torch.tensor(ids[: HISTORY + NEW])[None]
                targets = x[0, HISTORY + 1 :]
                for name, opts in policies.items():
                    conv = f"{i}-{name}"
                    with cachedattn.session(model, conv, **opts) as s:
                        model(x[:, :HISTORY])  # the stored history, computed at its original positions
                        logits = model(x).logits[0, -NEW:-1]  # overflow: 256 tokens dropped
                        assert s.dropped_tokens == 256
                    nll[name] += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
                    store.drop(conv)
                    prog.advance(task)
                count += len(targets)
        store.close()
    return {p: math.exp(v / count) for p, v in nll.items()} | {"_tokens": count, "_conversations": len(samples)}


def main() -> None:
    train, held = texts()
    tok = tokenizer(train)
    model, info = trained_model(tok, train)
    ppl = evaluate(model, tok, held, int(os.environ.get("CACHEDATTN_EVAL_CONVERSATIONS", "120")))
    table = Table(title=f"Perplexity of {NEW} new tokens after overflow (window {W}, 256 dropped)")
    table.add_column("policy")
    table.add_column("perplexity", justify="right")
    table.add_column("vs TT", justify="right")
    tt = ppl["TT (recompute)"]
    rows = [(p, v) for p, v in ppl.items() if not p.startswith("_")]
    for p, v in rows:
        table.add_row(p, f"{v:.3f}", f"{v - tt:+.3f}")
    console.print(table)
    lines = [
        "# Accuracy of context-window overflow policies",
        "",
        f"Model: 4-layer Llama-style, hidden 256, RoPE, trained here on ShareGPT for {info['minutes']:.0f} min on this "
        f"machine's CPUs ({info['steps']} steps, {info['tokens'] / 1e6:.1f} M tokens, final training loss "
        f"{info['final_loss']:.2f}); byte-level BPE tokenizer of {VOCAB} tokens trained on the same text.",
        f"Data: {ppl['_conversations']} held-out ShareGPT conversations; history {HISTORY} tokens stored, then {NEW} more "
        f"overflow the {W}-token window and 256 tokens are dropped; perplexity over {ppl['_tokens']} predicted tokens.",
        "Command: `python3 bench/accuracy.py`",
        "",
        "| policy | perplexity | vs TT |",
        "|---|---|---|",
        *[f"| {p} | {v:.3f} | {v - tt:+.3f} |" for p, v in rows],
        "",
    ]
    out = ROOT / "bench" / "results"
    (out / "accuracy.md").write_text("\n".join(lines))
    (out / "accuracy.json").write_text(json.dumps({"perplexity": ppl, "training": info}, indent=1))


if __name__ == "__main__":
    main()
