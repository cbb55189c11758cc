"""Serving many conversations: a job queue whose look-ahead drives the store."""

from cachedattn.serving.engine import Engine
from cachedattn.serving.job import Job
from cachedattn.serving.policies import PredictivePolicy, QueueAwarePolicy

__all__ = ["Engine", "Job", "QueueAwarePolicy", "PredictivePolicy"]
