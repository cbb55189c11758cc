"""Are a patched model's weights still the ones its store's KV was computed with?

patch() keys the store by a digest of every weight byte (hf.weights),
but weights can change afterwards in the same process: an in-place op
(``p.add_``, an optimizer step, ``load_state_dict``), ``p.data = other``, a
module swapped for another. Hashing every byte at every turn would cost
0.2 s per GB, so each turn compares a signature instead: for every parameter
and buffer its name, object, storage address, shape, strides, dtype and
torch's in-place write counter (``Tensor._version``), which every in-place op
on the tensor or a view of it increments. Only when the signature moved are
the tensors whose entry moved hashed again; the turn may use the store when
the digest still equals the one patch() attached.

Not seen by the signature (torch does not count them): writes through
``p.data`` (``p.data.add_(...)``), through numpy or DLPack views of the
memory, or to an alias made with ``p.data`` before; and writes to inference
tensors, which have no counter. After such a write, unpatch and patch again.
"""

from __future__ import annotations

import logging
import threading

import torch

from cachedattn.hf.weights import combine, model_tensors, tensor_digests

log = logging.getLogger("cachedattn")


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    sig = []
    for name, t in tensors:
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: no counter
            version = None
        sig.append((name, id(t), t.data_ptr(), version, t.shape, t.stride(), t.dtype))
    return tuple(sig)


class WeightsIdentity:
    """The digest of a model's weights at patch time, and a per-turn check that they are unchanged."""

    def __init__(self, model: torch.nn.Module):
        tensors = model_tensors(model)
        self._sig = _signature(tensors)
        digests = tensor_digests(tensors)
        self._digest_of = {entry: d for entry, d in zip(self._sig, digests)}  # signature entry -> tensor digest
        self.digest = combine([(n, t, d) for (n, t), d in zip(tensors, digests)])
        self.current = True  # the weights hash to self.digest
        self.generation = 0  # counts the checks that saw a tensor replaced, moved, reshaped or written
        self._lock = threading.Lock()

    def check(self, model: torch.nn.Module) -> bool:
        """True when the model's weights still hash to the digest patch() attached.
        Cheap when nothing was written since the last check; otherwise re-hashes what was.
        Never raises: weights it cannot read are not provably the same, so the answer is False."""
        with self._lock:
            try:
                tensors = model_tensors(model)
                sig = _signature(tensors)
                if sig == self._sig:
                    return self.current
                self.generation += 1
                # A tensor written to, replaced or reshaped has a new entry; the rest keep their digest.
                known = {id(t): self._digest_of[e] for e, (_, t) in zip(sig, tensors) if e in self._digest_of}
                digests = tensor_digests(tensors, known)
            except Exception as e:  # e.g. a tensor type added after patch() that has no bytes to read
                self._sig = None  # try again next turn
                self.generation += 1
                return self._set_current(False, f"cannot read the model's weights ({type(e).__name__}: {e})")
            current = combine([(n, t, d) for (n, t), d in zip(tensors, digests)]) == self.digest
            self._sig, self._digest_of = sig, dict(zip(sig, digests))
            return self._set_current(current, "the model's weights changed since patch()")

    def _set_current(self, current: bool, why: str) -> bool:
        if current and not self.current:
            log.info("cachedattn: the model's weights are back to those patch() saw: the store is used again")
        elif not current and self.current:  # once per change, not at every turn after it
            log.warning(
                "cachedattn: %s: turns recompute their whole history and store nothing; unpatch(model) and "
                "patch(model, store) with a store for the new weights to cache again",
                why,
            )
        self.current = current
        return current
