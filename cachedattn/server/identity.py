"""Which stored conversation a request continues, and its prompt's token ids.

Rule, first match wins:
1. an explicit id: the X-Session-ID header, the x-user-id header, the
   `conversation_id` field, the `user` field (in this order);
2. chat requests without one: the conversation whose earlier turn's prompt is a
   prefix of this request's, found by digest: for every user message of the
   request, latest first, the conversation is rendered up to it (with the
   generation prompt) and its digest looked up among the prompts served before;
3. otherwise a new conversation (a fresh id).

Token ids: a request whose rendered prompt starts with the text of the
conversation's last turn (its prompt plus the answer as sent) gets that turn's
token ids followed by the rest of the text encoded, so the answer counts as the
tokens generated, not as a re-encoding of their text (which a BPE may split
differently); otherwise the whole text is encoded. Reuse then reaches the
first difference, as sessions do. The index lives in memory (bounded, least
recently used out): after a restart only explicit ids find their stored KV.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable

HEADERS = ("x-session-id", "x-user-id")


def explicit_id(headers, conversation_id: str | None, user: str | None) -> str | None:
    for name in HEADERS:
        v = headers.get(name)
        if v:
            return "id:" + v
    for v in (conversation_id, user):
        if v:
            return "id:" + v
    return None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Conversations:
    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._last: OrderedDict[str, tuple[str, list[int]]] = OrderedDict()  # id -> (text, ids) of its last turn
        self._prompts: OrderedDict[bytes, str] = OrderedDict()  # digest of a served prompt -> id
        self._lock = threading.Lock()

    def find(self, prompts: Iterable[str]) -> str | None:
        """The conversation that served one of these prompts (tried in order)."""
        with self._lock:
            for p in prompts:
                conv = self._prompts.get(_digest(p))
                if conv is not None:
                    self._prompts.move_to_end(_digest(p))
                    return conv
        return None

    @staticmethod
    def new_id() -> str:
        return "auto:" + uuid.uuid4().hex

    def token_ids(self, conv_id: str, text: str, encode: Callable[[str], list[int]],
                  encode_rest: Callable[[str], list[int]]) -> list[int]:
        with self._lock:
            last = self._last.get(conv_id)
        if last is not None and last[0] and text.startswith(last[0]):
            return last[1] + encode_rest(text[len(last[0]):])
        return encode(text)

    def record(self, conv_id: str, prompt_text: str, full_text: str, full_ids: list[int]) -> None:
        with self._lock:
            self._last[conv_id] = (full_text, list(full_ids))
            self._last.move_to_end(conv_id)
            self._prompts[_digest(prompt_text)] = conv_id
            self._prompts.move_to_end(_digest(prompt_text))
            while len(self._last) > self.capacity:
                self._last.popitem(last=False)
            while len(self._prompts) > self.capacity:
                self._prompts.popitem(last=False)
