"""The served model: a local directory (never a download), or `tiny`, a small
Llama-style model built from the project's default config with random weights
and a byte-level BPE tokenizer trained here on ShareGPT text. The tiny model is
built once into a cache directory (CACHEDATTN_SERVE_CACHE, default
~/.cache/cachedattn/serve) and then loaded from there like any other model
directory, so clients that need the tokenizer (aiperf) can read it too."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("cachedattn")

TINY = "tiny"
TINY_VERSION = "tiny-v1"  # bump when the recipe below changes: a cached build is reused as is
SPECIALS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
EOS = "<|end|>"
# One message per block: the role's token, the text, then <|end|>. Content given as
# OpenAI content parts is flattened to text before rendering (schema.message_text).
TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TRAIN_CONVERSATIONS = 3000


def cache_root() -> Path:
    return Path(os.environ.get("CACHEDATTN_SERVE_CACHE", Path.home() / ".cache" / "cachedattn" / "serve"))


def resolve(model: str) -> Path:
    """The directory to load: `tiny` is built on first use; anything else must exist locally."""
    if model == TINY:
        return ensure_tiny(cache_root() / TINY_VERSION)
    d = Path(model).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"--model {model!r}: not a directory (models are loaded locally, never downloaded; "
                                f"--model {TINY} builds a small one)")
    return d


def _train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cachedattn.data import sharegpt

    texts = []
    for conv in sharegpt.conversations():
        texts.append("".join(f"<|{role}|>{msg}<|end|>\n" for role, msg in conv))
        if len(texts) >= TRAIN_CONVERSATIONS:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def ensure_tiny(target: Path) -> Path:
    """Builds the tiny model directory unless a complete one is there (written to a
    temporary directory, then renamed: a crash never leaves half a model)."""
    if (target / "complete").is_file():
        return target
    from cachedattn.hf.demo import small_model

    log.info("cachedattn: building the tiny model into %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model = small_model(seed=0)
    tok = _train_tokenizer(model.config.vocab_size)
    pad, eos = tok.token_to_id("<|pad|>"), tok.token_to_id(EOS)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = pad, eos, None
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS, "pad_token": "<|pad|>", "bos_token": None,
            "model_max_length": model.config.max_position_embeddings,
            "chat_template": TINY_TEMPLATE,
        }, indent=2))
        (tmp / "complete").write_text("")
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(directory: Path, device: str = "cpu", dtype: str | None = None):
    from cachedattn.hf.demo import load_local_model

    return load_local_model(str(directory), device, dtype)
