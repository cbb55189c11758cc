"""The HuggingFace transformers integration (the only place transformers is imported)."""

from cachedattn.hf.batch import batch_session
from cachedattn.hf.patch import patch, session, unpatch
from cachedattn.hf.probe import UnsupportedModel

__all__ = ["patch", "unpatch", "session", "batch_session", "UnsupportedModel"]
