"""The scheduler-aware eviction policies, where the serving engine finds them. They live
in the store (cachedattn.store.queue_policies): they decide from the queue view the
engine pushes (QueueView), so the store needs nothing of this package."""

from cachedattn.store.eviction import QueueView
from cachedattn.store.queue_policies import PredictivePolicy, QueueAwarePolicy

__all__ = ["PredictivePolicy", "QueueAwarePolicy", "QueueView"]
