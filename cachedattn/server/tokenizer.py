"""A model directory's tokenizer and chat template, read with the `tokenizers`
library and a sandboxed Jinja environment (as transformers renders chat
templates), so the server needs neither transformers' tokenizer classes nor a
download. A directory must hold tokenizer.json; the template comes from
tokenizer_config.json's `chat_template`, a chat_template.jinja file, or the
server's --chat-template override."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTokenizer:
    """encode/decode plus render(messages) with the model's chat template."""

    def __init__(self, directory: str | Path, chat_template: str | None = None):
        from tokenizers import Tokenizer

        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json (the server reads fast-tokenizer files only)")
        self.directory = d
        self._tok = Tokenizer.from_file(str(path))
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        template = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        self.chat_template = template
        self._template = _compile(template) if template else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (messages as OpenAI sends them, content as text)."""
        if self._template is None:
            raise ValueError(f"{self.directory}: the model has no chat template; pass --chat-template FILE")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=None)
