"""Serving many conversations: a job queue whose look-ahead drives the store."""

from cachedattn.serving.engine import Engine, Job
from cachedattn.serving.policies import QueueAwarePolicy

__all__ = ["Engine", "Job", "QueueAwarePolicy"]
