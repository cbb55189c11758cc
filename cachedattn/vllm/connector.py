"""CachedAttnConnector: cachedattn's store under vLLM, as a V1 KV connector.

Selected with vLLM's own flag::

    --kv-transfer-config '{"kv_connector": "CachedAttnConnector",
        "kv_connector_module_path": "cachedattn.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"host_bytes": "8G", "disk_dir": "/nvme/kv"}}'

vLLM makes one connector per role, in different processes on the CPU build:
the scheduler side (plan.PrefixPlanner) keys a request's blocks and plans
lookups, loads and saves; the worker side owns the store and carries the
plan out (transfers.PagedTransfers) between the store and vLLM's paged KV.
The plan goes down in vLLM's per-step connector metadata; lookup answers
come back in its per-step worker metadata.

Supported now (refused at start otherwise, naming why): one worker process
(tensor and pipeline parallel size 1), one KV cache group of full attention,
and two plans chosen by vLLM's device, which both roles see:

- CPU (transfers.PagedTransfers, vLLM's CPU paged layout): by default loads
  are synchronous too (copied in the step that schedules the request; its
  lookup, while it waited in vLLM's queue, brought the blocks into host
  memory); with "loads": "async" (options.py) the copy also runs while the
  request waits, and vLLM schedules it after the copy is reported;
- CUDA (device_transfers.DeviceTransfers, the FlashAttention/NHD layout, the
  copy engine): loads are synchronous, H2D layer by layer inside the step
  that schedules the request (the lookup brought the blocks into host memory
  before answering); the store holds one head of kv_heads * head_dim per
  token, and the keys' namespace names the layout, so neither plan's KV is
  found by the other.

On both, saves happen when a request finishes, and vLLM keeps the blocks
until the copy is done. A block that cannot be loaded is reported to vLLM,
which recomputes it: the connector sets kv_load_failure_policy to
"recompute" so that a request never fails because of the cache. Requests
whose KV does not follow from their tokens alone (a LoRA adapter,
multimodal inputs, prompt embeddings) bypass the store, and vLLM's
cache_salt is part of the keys (scope.py).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from cachedattn.store import AttentionStore, KVSpec
from cachedattn.vllm import identity, metrics
from cachedattn.vllm.device_loads import device_store_spec
from cachedattn.vllm.device_transfers import device_transfers
from cachedattn.vllm.options import store_config, sync_loads
from cachedattn.vllm.paged import PagedKV
from cachedattn.vllm.plan import PrefixPlanner, StepPlan
from cachedattn.vllm.prefix_keys import namespace
from cachedattn.vllm.scope import request_scope
from cachedattn.vllm.transfers import PagedTransfers

log = logging.getLogger("cachedattn")


class CachedAttnMetadata(KVConnectorMetadata):
    def __init__(self, plan: StepPlan):
        self.plan = plan


class CachedAttnWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step: the answers to the lookups the scheduler side asked for."""

    def __init__(self, answers: dict[str, int]):
        self.answers = answers

    def aggregate(self, other: "CachedAttnWorkerMetadata") -> "CachedAttnWorkerMetadata":
        return CachedAttnWorkerMetadata({**self.answers, **other.answers})


# Worker-side connectors whose store is open (the tests check that vLLM's shutdown closes them).
open_workers: "weakref.WeakSet[CachedAttnConnector]" = weakref.WeakSet()


class CachedAttnConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.world_size > 1:
            raise ValueError(
                f"CachedAttnConnector: {parallel.world_size} workers (tensor/pipeline parallel); "
                "the connector supports one worker process for now"
            )
        if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError("CachedAttnConnector: the model must have one KV cache group (full attention only)")
        group = kv_cache_config.kv_cache_groups[0]
        kspec = group.kv_cache_spec
        if type(kspec).__name__ != "FullAttentionSpec" or getattr(kspec, "sliding_window", None):
            raise ValueError(f"CachedAttnConnector: {type(kspec).__name__} layers are not supported (full attention only)")
        if getattr(kspec, "head_size_v", kspec.head_size) != kspec.head_size:
            raise ValueError("CachedAttnConnector: K and V head sizes differ; not supported")
        self.block_tokens = kspec.block_size
        self.layer_names = list(group.layer_names)
        self._layer_index = {n: i for i, n in enumerate(self.layer_names)}
        self.kv_heads, self.head_size = kspec.num_kv_heads, kspec.head_size
        model = vllm_config.model_config
        digest = identity.model_digest(model)
        # The plan follows vLLM's device, which both roles see: on CUDA the paged KV is in the CUDA backends'
        # layout (checked at register_kv_caches), stored as one head of kv_heads * head_dim per token.
        self.device_plan = getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu") == "cuda"
        if self.device_plan:
            spec = device_store_spec(len(self.layer_names), kspec.num_kv_heads, kspec.head_size, kspec.dtype, digest)
            layout = "paged-cuda-nhd"  # never the CPU layout's keys: KV of one layout is not served into another
        else:
            spec = KVSpec.uniform(len(self.layer_names), kspec.num_kv_heads, kspec.head_size, kspec.dtype, model_digest=digest)
            layout = f"paged-{getattr(kv_cache_config, 'kv_cache_layout', '?')}"
        extra = self._kv_transfer_config.kv_connector_extra_config
        config = store_config(extra, self.block_tokens)  # refused early
        self.sync_loads = self.device_plan or sync_loads(extra)
        ns = namespace(digest, str(kspec.dtype), layout, self.block_tokens)
        self.planner = self.transfers = self.store = None
        self._reported: dict[str, int] = {}  # the counts the last stats report covered
        self._bypass_logged: set[str] = set()  # kinds of requests the store does not serve, said once each
        if role == KVConnectorRole.WORKER:
            # The store lives with the worker, beside the paged KV it fills; the scheduler side asks it.
            self.store = AttentionStore.from_config(config, spec=spec)
            open_workers.add(self)
        else:
            self.planner = PrefixPlanner(ns, self.block_tokens, sync_loads=self.sync_loads)
            # Read by vLLM's scheduler after it builds this connector: a block we cannot load is
            # recomputed, never a failed request.
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.info("cachedattn: kv_load_failure_policy set to 'recompute' (a request never fails because of the cache)")
                self._kv_transfer_config.kv_load_failure_policy = "recompute"

    # ---- worker side -------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"CachedAttnConnector: no paged KV registered for layers {missing}")
        caches = [kv_caches[n] for n in self.layer_names]
        if self.device_plan:  # refuses other layouts by shape
            self.transfers = device_transfers(self.store, caches, self.block_tokens, self.kv_heads, self.head_size)
        else:
            paged = PagedKV(caches, self.block_tokens, self.kv_heads, self.head_size)
            self.transfers = PagedTransfers(self.store, paged, sync_loads=self.sync_loads)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.transfers is not None and isinstance(meta, CachedAttnMetadata):
            self.transfers.submit(meta.plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # The GPU plan: this layer's attention after its copies. The CPU plan's loads completed before
        # vLLM scheduled their request.
        if self.device_plan and self.transfers is not None:
            self.transfers.wait_layer(self._layer_index[layer_name])

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saves happen when a request finishes, from the blocks vLLM keeps for them

    def wait_for_save(self) -> None:
        if self.device_plan and self.transfers is not None:
            self.transfers.finish_step()  # the step's loads end after the forward (saves never wait here)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.transfers is None:
            return None, None
        sent, received = self.transfers.finished()
        if sent or received:
            log.debug("cachedattn: saved %s, loaded %s", sorted(sent), sorted(received))
        return (sent or None), (received or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.transfers.failed_blocks() if self.transfers is not None else set()

    def get_kv_connector_stats(self):
        if self.transfers is None:
            return None
        now = metrics.counts(self.transfers, self.store)
        d = metrics.delta(now, self._reported)
        self._reported = now
        return metrics.CachedAttnStats(data=d) if d else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return metrics.CachedAttnStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return metrics.CachedAttnPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        answers = self.transfers.answers() if self.transfers is not None else {}
        return CachedAttnWorkerMetadata(answers) if answers else None

    def shutdown(self) -> None:
        if self.transfers is not None:
            self.transfers.close()  # waits for the transfers in flight
            self.transfers = None
        if self.store is not None:
            self.store.close()
            self.store = None
            open_workers.discard(self)
        if self.planner is not None and self.planner.saves_in_flight:
            log.warning("cachedattn: vLLM shut down with %d requests' saves unfinished; their blocks are not stored",
                        self.planner.saves_in_flight)

    # ---- scheduler side ----------------------------------------------------------

    def _scope(self, request):
        scope = request_scope(request)
        if scope.bypass is not None and scope.bypass not in self._bypass_logged:
            self._bypass_logged.add(scope.bypass)
            log.warning("cachedattn: requests with %s are served by vLLM alone: nothing is loaded or stored for them", scope.bypass)
        return scope

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        scope = self._scope(request)
        if scope.bypass is not None or not scope.load:
            return 0, False
        tokens = list(request.all_token_ids)[: request.num_tokens]
        n = self.planner.matched(request.request_id, tokens, num_computed_tokens, salt=scope.salt)
        log.debug("cachedattn: request %s: %s of %d tokens stored beyond vLLM's %d", request.request_id, n, len(tokens), num_computed_tokens)
        return n, bool(n) and not self.planner.sync_loads  # sync loads: copied in the step that schedules it

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self.planner.allocated(request.request_id, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return CachedAttnMetadata(self.planner.take_step())

    def update_connector_output(self, connector_output) -> None:
        self.planner.reported(connector_output.finished_sending or (), connector_output.finished_recving or ())
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, CachedAttnWorkerMetadata):
            self.planner.answered(meta.answers)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        if block_ids and isinstance(block_ids[0], (list, tuple)):
            block_ids = block_ids[0]
        scope = self._scope(request)
        if scope.bypass is not None:
            return False, None
        hold = self.planner.finished(
            request.request_id, list(request.all_token_ids), request.num_computed_tokens, list(block_ids), salt=scope.salt
        )
        log.debug("cachedattn: request %s finished with %d computed tokens; saving: %s", request.request_id, request.num_computed_tokens, hold)
        return hold, None
