"""`python -m cachedattn compat`: which causal LMs cachedattn serves.

For every architecture transformers lists under AutoModelForCausalLM, build
tiny random models from its config (cachedattn.hf.tiny) in several configurations (VARIANTS:
different head dims, GQA ratios, expert counts and top-k, sliding windows
where the config has one, NoPE layers where it has them), run a conversation
through cachedattn that mixes generate() and plain forwards, with a store
restart in the middle (history read back from disk), and compare every turn
with full recompute: tokens equal, logits within 1e-4 (fp32). Status per
architecture:

- works: every configuration built, and every turn of each matched recompute;
- refused: patch() refused it, with the reason (recurrent state, MLA, ...);
- fails: cachedattn served it, but a turn differed or raised. The detail says
  whether transformers' own DynamicCache reuse differs from recompute in the
  same way (then the model's incremental decoding itself is inexact, e.g. a
  near-tied MoE routing decision flips) or not (then cachedattn is at fault);
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
from transformers import DynamicCache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import cachedattn
from cachedattn.hf.probe import UnsupportedModel
from cachedattn.hf.tiny import VARIANTS, tiny_model

# (kind, new tokens): generate or a plain forward; "restart" reopens the store and re-patches first.
TURNS = (("generate", 20), ("forward", 14), ("restart+generate", 10), ("forward", 8))
GEN = 3
TOL = 1e-4
TIMEOUT_S = 60  # per configuration (wall clock)
log = logging.getLogger("cachedattn")


class _Timeout(BaseException):
    """One configuration's check ran past TIMEOUT_S (a BaseException: the checks' own
    `except Exception` must not turn it into a failure of the model)."""


def _vocab(model) -> int:
    return min(getattr(model.config.get_text_config(decoder=True), "vocab_size", 512) or 512, 512)


def _generate(model, ids, cache=None):
    extra = {} if cache is None else {"past_key_values": cache}
    return model.generate(ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0, **extra)


def _conversation(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (1, n), generator=g) for _, n in TURNS]


def _turn(model, kind, history, new, cache=None):
    """One turn: (ids after it, generated tokens or None, logits of the computed tokens)."""
    full = torch.cat([history, new], 1)
    if kind.endswith("generate"):
        out = _generate(model, full, cache)
        return out.sequences, out.sequences[:, full.shape[1]:], torch.stack(out.logits, 1)[0]
    if cache is not None:
        logits = model(input_ids=full[:, cache.get_seq_length():], past_key_values=cache, use_cache=True).logits
    else:
        logits = model(full).logits
    return full, None, logits[0]


def _compare(got, ref) -> float | None:
    """Max logit difference over the tokens `got` computed; None when the tokens differ."""
    (_, toks, logits), (_, rtoks, rlogits) = got, ref
    if toks is not None and not torch.equal(toks, rtoks):
        return None
    return (logits - rlogits[-logits.shape[0]:]).abs().max().item()


def _dynamic_cache_worst(model, convo) -> float:
    """transformers' own KV-cache reuse over the same turns, against recompute."""
    cache, history, worst = DynamicCache(config=model.config), torch.zeros(1, 0, dtype=torch.long), 0.0
    for (kind, _), new in zip(TURNS, convo):
        got = _turn(model, kind, history, new, cache)
        diff = _compare(got, _turn(model, kind, history, new))
        if diff is None:
            return float("inf")
        worst, history = max(worst, diff), got[0]
    return worst


def check_variant(arch: str, variant: int) -> dict:
    try:
        model = tiny_model(arch, variant)
        with torch.no_grad():
            _generate(model, torch.randint(2, _vocab(model), (1, 8)))
    except Exception as e:
        return {"status": "not tested", "detail": f"tiny model: {type(e).__name__}: {str(e)[:160]}"}
    convo = _conversation(_vocab(model))
    with tempfile.TemporaryDirectory() as d:
        def open_store():
            return cachedattn.AttentionStore(host_bytes=64 << 20, disk_dir=d, chunk_tokens=16, hugepages="off")

        store = open_store()
        try:
            try:
                cachedattn.patch(model, store)
            except UnsupportedModel as e:
                return {"status": "refused", "detail": str(e)[:200]}
            scheme = model._cachedattn.positions
            result = {"positions": f"{scheme.kind}: {scheme.reason}"}
            history, worst, reused = torch.zeros(1, 0, dtype=torch.long), 0.0, []
            with torch.no_grad():
                for turn, ((kind, _), new) in enumerate(zip(TURNS, convo)):
                    if kind.startswith("restart"):
                        cachedattn.unpatch(model)
                        store.close()
                        store = open_store()
                        cachedattn.patch(model, store)
                    with cachedattn.session(model, "compat") as s:
                        got = _turn(model, kind, history, new)
                    diff = _compare(got, _turn(model, kind, history, new))
                    if turn and s.reused_tokens == 0:
                        return {**result, "status": "fails", "detail": f"turn {turn + 1} ({kind}) reused nothing"}
                    if diff is None or diff > TOL:
                        what = "generated tokens differ" if diff is None else f"logits differ by {diff:.1e}"
                        dc = _dynamic_cache_worst(model, convo)
                        why = ("transformers' DynamicCache reuse differs from recompute too "
                               f"({'tokens' if dc == float('inf') else f'{dc:.1e}'}): the model's incremental decoding "
                               "is inexact" if dc > TOL else f"transformers' DynamicCache reuse matches ({dc:.1e})")
                        return {**result, "status": "fails", "detail": f"turn {turn + 1} ({kind}): {what}; {why}"}
                    worst, history = max(worst, diff), got[0]
                    reused.append(s.reused_tokens)
            return {**result, "status": "works", "worst": worst, "reused": reused}
        except Exception as e:
            return {"status": "fails", "detail": f"{type(e).__name__}: {str(e)[:160]}"}
        finally:
            store.close()


def check(arch: str) -> dict:
    """Every configuration of one architecture; stops at the first that is refused or fails."""
    runs = []
    for v in range(len(VARIANTS)):
        signal.alarm(TIMEOUT_S)
        try:
            r = check_variant(arch, v)
        except _Timeout:
            r = {"status": "not tested", "detail": f"timed out after {TIMEOUT_S} s"}
        finally:
            signal.alarm(0)
        runs.append(r)
        # Refused or failing: that is the verdict. Not even the first configuration builds: nor will the others.
        if r["status"] in ("fails", "refused") or (r["status"] == "not tested" and not any(
                x["status"] == "works" for x in runs)):
            break
    worked = [r for r in runs if r["status"] == "works"]
    bad = [r for r in runs if r["status"] in ("fails", "refused")]
    untested = [(i + 1, r) for i, r in enumerate(runs) if r["status"] == "not tested"]
    if bad:
        i = runs.index(bad[0]) + 1
        out = {"status": bad[0]["status"], "detail": bad[0]["detail"] if bad[0]["status"] == "refused" or len(runs) == 1
               else f"config {i}: {bad[0]['detail']} ({len(worked)} config(s) worked)"}
    elif worked:
        detail = (f"{len(worked)} config(s) x {len(TURNS)} turns; max logit diff {max(r['worst'] for r in worked):.1e}; "
                  f"reused {worked[0]['reused'][-1]} tokens in the last turn")
        if untested:
            detail += "; " + "; ".join(f"config {i} not built ({r['detail'][:80]})" for i, r in untested)
        out = {"status": "works", "detail": detail}
    else:
        out = {"status": "not tested", "detail": runs[0]["detail"]}
    out["configs"] = len(worked)
    positions = next((r["positions"] for r in runs if "positions" in r), None)
    if positions:
        out["positions"] = positions
    return out


def _alarm(signum, frame):
    raise _Timeout()


def main(argv=None) -> None:
    from cachedattn.console import example, track

    p = argparse.ArgumentParser(prog="cachedattn compat", description=__doc__.split("\n\n")[0],
                                **example("python3 -m cachedattn compat --only llama gpt2"))
    p.add_argument("--out", default=None, help="write a Markdown table and a JSON file with this stem")
    p.add_argument("--only", nargs="*", help="architectures to check (default: all)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    log.setLevel(logging.ERROR)
    archs = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = {}
    signal.signal(signal.SIGALRM, _alarm)
    for arch in track(archs, "checking architectures", unit="architectures"):
        t0 = time.perf_counter()
        results[arch] = check(arch)
        results[arch]["seconds"] = round(time.perf_counter() - t0, 1)
        if args.out:
            _write(results, args.out)  # after every architecture: a run cut short still leaves its table
    if not args.out:
        print(_table(results))


def _write(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text(_table(results))
    Path(out + ".json").write_text(json.dumps(results, indent=1))


def _table(results: dict) -> str:
    import transformers

    counts = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"# cachedattn support table (transformers {transformers.__version__}, torch {torch.__version__})",
        "",
        "Generated by `python -m cachedattn compat --out docs/compat`: per architecture, tiny random fp32 models in "
        f"up to {len(VARIANTS)} configurations (GQA 4:2 / head_dim 16 / 4 experts top-2; MQA / head_dim 32 / 8 experts "
        "top-1 / sliding window 24; MHA 8 heads / head_dim 8 / top-3 / window 40; sliding windows, expert counts and "
        "RoPE/NoPE layer patterns only where the config has them), each through a "
        f"{len(TURNS)}-turn conversation ({', '.join(k for k, _ in TURNS)}) via cachedattn and via full recompute: "
        f"tokens equal and logits within {TOL:g} in every turn. `configs`: how many configurations ran and matched. "
        "`positions`: how the probe found positions in the cached keys, per layer (what an overflow does).",
        "",
        "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        "",
        "| architecture | status | configs | positions | detail |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {r['status']} | {r['configs']} | {r.get('positions', '').replace('|', '/')} | "
              f"{r['detail'].replace('|', '/')} |" for a, r in results.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
