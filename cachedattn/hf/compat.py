"""`python -m cachedattn compat`: which causal LMs cachedattn serves.

For every architecture transformers lists under AutoModelForCausalLM, build a
tiny random model from its config, run a 3-turn conversation through
cachedattn and through full recompute (greedy), and compare tokens and
logits. Status per architecture:

- works: every turn's tokens are equal and logits within 1e-4;
- refused: patch() refused it, with the reason (recurrent state, MLA, ...);
- fails: cachedattn served it, but the results differ or it raised;
- not tested: no tiny model could be built or run even without cachedattn.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import cachedattn
from cachedattn.hf.probe import UnsupportedModel

SHRINK = {
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "hidden_dim": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
    "vocab_size": 512,
}
TURNS = (30, 20, 20)
GEN = 4
TIMEOUT_S = 90
log = logging.getLogger("cachedattn")


class _Timeout(Exception):
    """One architecture's check ran past TIMEOUT_S."""


def _shrink(cfg) -> None:
    for sub in [cfg, *(getattr(cfg, n, None) for n in ("text_config", "decoder"))]:
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        for k, v in SHRINK.items():
            if isinstance(getattr(sub, k, None), int) and not isinstance(getattr(sub, k), bool):
                setattr(sub, k, v)
        for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            if isinstance(getattr(sub, k, None), int) and getattr(sub, k) >= SHRINK["vocab_size"]:
                setattr(sub, k, 1)


def _generate(model, ids):
    return model.generate(ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0)


def check(arch: str) -> dict:
    try:
        cfg = AutoConfig.for_model(arch)
        _shrink(cfg)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        vocab = min(getattr(cfg.get_text_config(decoder=True), "vocab_size", 512) or 512, 512)
        with torch.no_grad():
            _generate(model, torch.randint(2, vocab, (1, 8)))
    except Exception as e:
        return {"status": "not tested", "detail": f"tiny model: {type(e).__name__}: {str(e)[:160]}"}
    with tempfile.TemporaryDirectory() as d:
        store = cachedattn.AttentionStore(host_bytes=64 << 20, disk_dir=d, chunk_tokens=16, hugepages="off")
        try:
            try:
                cachedattn.patch(model, store)
            except UnsupportedModel as e:
                return {"status": "refused", "detail": str(e)[:200]}
            g = torch.Generator().manual_seed(1)
            history = torch.zeros(1, 0, dtype=torch.long)
            worst = 0.0
            with torch.no_grad():
                for n_new in TURNS:
                    full = torch.cat([history, torch.randint(2, vocab, (1, n_new), generator=g)], 1)
                    with cachedattn.session(model, "compat") as s:
                        out = _generate(model, full)
                    ref = _generate(model, full)
                    if not torch.equal(out.sequences, ref.sequences):
                        return {"status": "fails", "detail": "generated tokens differ from recompute"}
                    worst = max(worst, max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)))
                    history = out.sequences
            if worst > 1e-4:
                return {"status": "fails", "detail": f"logits differ from recompute by {worst:.2e}"}
            return {"status": "works", "detail": f"max logit diff {worst:.1e}; reused {s.reused_tokens} tokens in turn 3"}
        except Exception as e:
            return {"status": "fails", "detail": f"{type(e).__name__}: {str(e)[:160]}"}
        finally:
            store.close()


def _alarm(signum, frame):
    raise _Timeout()


def main(argv=None) -> None:
    import transformers

    p = argparse.ArgumentParser(prog="cachedattn compat", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write a Markdown table and a JSON file with this stem")
    p.add_argument("--only", nargs="*", help="architectures to check (default: all)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    log.setLevel(logging.ERROR)
    archs = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = {}
    signal.signal(signal.SIGALRM, _alarm)
    from rich.progress import track

    for arch in track(archs, description="checking architectures"):
        t0 = time.perf_counter()
        signal.alarm(TIMEOUT_S)
        try:
            results[arch] = check(arch)
        except _Timeout:
            results[arch] = {"status": "not tested", "detail": f"timed out after {TIMEOUT_S} s"}
        finally:
            signal.alarm(0)
        results[arch]["seconds"] = round(time.perf_counter() - t0, 1)
    counts = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"# cachedattn support table (transformers {transformers.__version__}, torch {torch.__version__})",
        "",
        "Generated by `python -m cachedattn compat --out docs/compat`: a tiny random model per architecture, "
        f"a {len(TURNS)}-turn greedy conversation through cachedattn and through full recompute.",
        "",
        "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        "",
        "| architecture | status | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {r['status']} | {r['detail'].replace('|', '/')} |" for a, r in results.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
