"""Which stored conversation a request continues, and its prompt's token ids.

Rule, first match wins:
1. an explicit id: the X-Session-ID header, the x-user-id header, the
   `conversation_id` field, the `user` field (in this order);
2. chat requests without one: a conversation found by digest among the turns
   served before. For each assistant message of the request, latest first:
   the conversation rendered up to that message (with the generation prompt)
   plus the message's text is looked up among the turns' prompts-plus-answers
   as sent (the client continues that very turn); failing that, the rendered
   prefix alone among the turns' prompts (the client or its template rewrote
   the answer). Of the conversations that served the turn found, the most
   recent one that has not moved on is taken: one whose last prompt is a
   prefix of this request's. So conversations that open alike (same
   messages, same greedy answers) share an id only until they differ, then
   each keeps its own;
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

from cachedattn.server.errors import bad_request
from cachedattn.store.keys import MAX_ID_BYTES, validate_conversation_id

HEADERS = ("x-session-id", "x-user-id")
SHARERS = 8  # conversations remembered per served turn (alike openings)


PREFIX = "id:"  # explicit ids live apart from the ids the server makes up (new_id)
ID_LIMIT = MAX_ID_BYTES - len(PREFIX)  # the longest id a client may send, in UTF-8 bytes


def _header_text(raw: str) -> str:
    """A header's value as the id its bytes spell in UTF-8. The HTTP layer hands
    them over as Latin-1 characters (one per byte); read as such, "é" would be a
    different id in a header than in the `conversation_id` field, and twice as long."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ValueError("the header is not valid UTF-8") from None


def explicit_id(headers, conversation_id: str | None, user: str | None) -> str | None:
    """The conversation a request names, or None. An id the store would refuse
    (too long with the prefix, NUL, not Unicode) is the client's error: a 400
    naming where it came from, before it reaches the store. An empty value names
    nothing (clients send an empty header for "no session")."""
    named = [(name, headers.get(name)) for name in HEADERS] + [("conversation_id", conversation_id), ("user", user)]
    for name, v in named:
        if v:
            try:
                if name in HEADERS:
                    v = _header_text(v)
                n = len(v.encode("utf-8"))
                if n > ID_LIMIT:  # said here, not by the store, whose limit counts the prefix
                    raise ValueError(f"the id is {n} bytes long; the limit is {ID_LIMIT} bytes")
                return validate_conversation_id(PREFIX + v)
            except ValueError as e:  # UnicodeEncodeError (a lone surrogate) included
                raise bad_request(f"{name}: {e}", name) from None
    return None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Conversations:
    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        # id -> its last turn: (prompt text, prompt + answer text as sent, their token ids)
        self._last: OrderedDict[str, tuple[str, str, list[int]]] = OrderedDict()
        # digest of a served prompt / prompt + answer -> the ids that served it, most recent last
        self._prompts: OrderedDict[bytes, list[str]] = OrderedDict()
        self._turns: OrderedDict[bytes, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, prompt: str, turns: Iterable[tuple[str, str]]) -> str | None:
        """The conversation a request with this rendered prompt continues, from
        (rendered prefix, assistant text) pairs of its assistant messages, latest first."""
        for prefix, answer in turns:
            with self._lock:
                for index, key in ((self._turns, _digest(prefix + answer)), (self._prompts, _digest(prefix))):
                    for conv in reversed(index.get(key, ())):
                        last = self._last.get(conv)
                        if last is not None and prompt.startswith(last[0]):
                            index.move_to_end(key)
                            return conv
        return None

    @staticmethod
    def new_id() -> str:
        return "auto:" + uuid.uuid4().hex

    def token_ids(self, conv_id: str, text: str, encode: Callable[[str], list[int]],
                  encode_rest: Callable[[str], list[int]]) -> list[int]:
        with self._lock:
            last = self._last.get(conv_id)
        if last is not None and last[1] and text.startswith(last[1]):
            return last[2] + encode_rest(text[len(last[1]):])
        return encode(text)

    def record(self, conv_id: str, prompt_text: str, full_text: str, full_ids: list[int]) -> None:
        with self._lock:
            self._last[conv_id] = (prompt_text, full_text, list(full_ids))
            self._last.move_to_end(conv_id)
            for index, text in ((self._prompts, prompt_text), (self._turns, full_text)):
                ids = index.setdefault(_digest(text), [])
                if conv_id in ids:
                    ids.remove(conv_id)
                ids.append(conv_id)
                del ids[:-SHARERS]
                index.move_to_end(_digest(text))
            for index in (self._last, self._prompts, self._turns):
                while len(index) > self.capacity:
                    index.popitem(last=False)
