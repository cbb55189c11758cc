"""OpenAI request shapes (pydantic; unknown fields are accepted and ignored),
response and streamed-chunk bodies, and server-sent event framing."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cachedattn.server.errors import bad_request


def _unicode(value: Any) -> Any:
    """Text that is valid Unicode, in any nesting. JSON may escape a lone surrogate
    (\\ud800); no tokenizer, store or UTF-8 response can take one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode(k)
            _unicode(v)
    elif isinstance(value, list):
        for v in value:
            _unicode(v)
    return value


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        """Every field of every request model, nested models included (each checks its own fields)."""
        return _unicode(value)


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class Message(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Sampling(_Lenient):
    model: str
    # Ranges are OpenAI's (vLLM's for top_k); a value the backend cannot take never gets past here.
    # max_tokens has no upper bound here: above the room left in the context it is context_length_exceeded.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # NaN and inf fail the bounds
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # -1 and 0: every token
    n: int | None = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    # OpenAI's seed is an int64, as is what torch's generator takes.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    conversation_id: str | None = None
    presence_penalty: float | None = Field(default=0, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=0, ge=-2, le=2)
    logprobs: bool | int | None = None  # chat: a bool; completions: 0..5 (refused unless false/0 either way)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None


def check_supported(req: _Sampling) -> None:
    """What the server cannot honour is refused up front, naming the field."""
    if req.n not in (None, 1):
        raise bad_request("n: only n=1 is supported", "n", "unsupported_value")
    if req.best_of not in (None, 1):
        raise bad_request("best_of: only best_of=1 is supported", "best_of", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name}: penalties are not supported (send 0 or omit it)", name, "unsupported_value")
    if req.logprobs is not None and not isinstance(req.logprobs, bool) and not 0 <= req.logprobs <= 5:
        raise bad_request("logprobs: an integer in [0, 5] (completions) or a bool (chat)", "logprobs")
    if req.logprobs:
        raise bad_request("logprobs are not supported", "logprobs", "unsupported_value")
    if isinstance(req, ChatRequest) and req.top_logprobs:
        raise bad_request("top_logprobs: logprobs are not supported", "top_logprobs", "unsupported_value")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_value")
    if req.echo:
        raise bad_request("echo is not supported", "echo", "unsupported_value")
    stops = stop_list(req)
    if len(stops) > 4 or any(not s for s in stops):
        raise bad_request("stop: up to 4 non-empty strings", "stop")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise bad_request("tools are not supported by this server", "tools", "unsupported_value")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only {'type': 'text'} is supported", "response_format",
                              "unsupported_value")
    if isinstance(req, CompletionRequest) and req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported_value")


def stop_list(req: _Sampling) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def message_text(m: Message, index: int) -> dict:
    """A message as the chat template sees it: role and text content."""
    content = m.content
    if isinstance(content, list):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{index}].content: only text parts are supported",
                                  f"messages[{index}].content", "unsupported_value")
            parts.append(p["text"])
        content = "".join(parts)
    if m.role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad_request(f"messages[{index}].role: unknown role {m.role!r}", f"messages[{index}].role")
    return {"role": "system" if m.role == "developer" else m.role, "content": content or ""}


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_response(rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def completion_response(rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


class ChunkWriter:
    """Streamed chunks of one response, in OpenAI's format: every chunk but the
    usage chunk carries one choice (`delta` for chat, `text` for completions);
    with stream_options.include_usage, each of them says "usage": null and a last
    chunk with `choices: []` carries the usage; `data: [DONE]` ends the stream."""

    def __init__(self, kind: Literal["chat", "completion"], rid: str, created: int, model: str, include_usage: bool):
        self.kind, self.include_usage = kind, include_usage
        self.base = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                     "created": created, "model": model}

    def _chunk(self, choice: dict) -> str:
        body = {**self.base, "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def role(self) -> str:
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}) if self.kind == "chat" else ""

    def text(self, text: str, finish: str | None = None) -> str:
        if self.kind == "chat":
            delta = {"content": text} if text else {}
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": finish})

    def usage(self, use: dict) -> str:
        return sse({**self.base, "choices": [], "usage": use}) if self.include_usage else ""

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
