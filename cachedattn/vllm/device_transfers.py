"""The connector's worker side on the GPU plan: vLLM's paged KV in the CUDA
layout (device_loads.PagedDeviceKV), filled and saved through the copy
engine.

What differs from the CPU plan (transfers.PagedTransfers, whose lookups and
queue pushes this reuses):

- loads are synchronous in vLLM's sense: the scheduler side answers
  load_async=False, vLLM schedules the request at once, and its blocks are
  copied H2D during that very step, layer by layer (start_load_kv starts
  them, wait_for_layer_load orders each layer's attention after its copies,
  finish_step after the forward gives the host blocks back). No request
  waits in vLLM's queue for a load, and none is reported finished_recving;
- so that the in-step load is H2D only, a lookup brings the blocks it
  counted from disk or the remote tier into host memory (prefetch) before it
  answers: the scheduler learns of the match only once the bytes are in host
  memory (a block evicted again meanwhile is read from disk during the step,
  which is slower, not wrong);
- saves go D2H from the blocks vLLM keeps for a finished request
  (device_saves.DeviceSaves), the request reported finished_sending once
  they are committed.

A block that cannot be loaded is reported through failed_blocks in the same
step (vLLM recomputes it: for synchronous loads it truncates the request's
computed tokens there).
"""

from __future__ import annotations

import logging

from cachedattn.transfer.factory import engine_for, fake_requested
from cachedattn.vllm.device_loads import DeviceLoads, PagedDeviceKV
from cachedattn.vllm.device_saves import DeviceSaves
from cachedattn.vllm.plan import BlockMove, StepPlan
from cachedattn.vllm.transfers import PagedTransfers

log = logging.getLogger("cachedattn")


def device_transfers(store, caches, block_tokens: int, kv_heads: int, head_dim: int) -> DeviceTransfers:
    """The GPU plan's worker for vLLM's paged tensors; refuses (ValueError, naming why) tensors in another
    layout, off a CUDA device (CPU tensors only under the fake copy engine, for tests), or without an engine."""
    paged = PagedDeviceKV(caches, block_tokens, kv_heads, head_dim)
    if paged.device.type != "cuda" and not fake_requested():
        raise ValueError(
            f"paged KV on {paged.device}: the connector's GPU plan needs CUDA tensors (vLLM's CPU build uses its "
            "CPU layout)"
        )
    engine = engine_for(paged.device, paged.num_layers, store.gpu_pinned)
    if engine is None:
        raise ValueError(f"no copy engine for the paged KV on {paged.device} (the log line above says why)")
    return DeviceTransfers(store, paged, engine)


class DeviceTransfers(PagedTransfers):
    def __init__(self, store, paged: PagedDeviceKV, engine, threads: int = 2):
        super().__init__(store, paged, threads, sync_loads=True)
        self.engine = engine
        self.loads = DeviceLoads(store, paged, engine)
        self.saves = DeviceSaves(store, paged, engine, self._saved)
        self._step_loads: list[BlockMove] = []  # the loads of the step in progress (until finish_step)

    # ---- the step, driven by the worker's forward -------------------------------------

    def _transfer(self, plan: StepPlan) -> None:
        self.finish_step()  # (a step whose forward never reached get_finished: its loads end first)
        if plan.loads:
            self._step_loads = list(plan.loads)
            try:
                self.loads.start(plan.loads)
            except Exception as e:  # noqa: BLE001 - the engine failed: the step recomputes these blocks
                self._loads_failed(e)
        if plan.saves:
            with self._lock:
                self._pending += len(plan.saves)  # wait_idle covers them; _saved counts each down
            self.saves.start(plan.saves)

    def wait_layer(self, layer: int) -> None:
        """wait_for_layer_load: the compute stream's next work comes after this layer's copies."""
        try:
            self.loads.wait_layer(layer)
        except Exception as e:  # noqa: BLE001
            self._loads_failed(e)

    def finish_step(self) -> None:
        """After the forward (wait_for_save / get_finished): the step's loads end, their host blocks go
        back after their copies, and the blocks not loaded are counted as failed."""
        if not self._step_loads:
            return
        try:
            self.loads.finish()
        except Exception as e:  # noqa: BLE001
            self._loads_failed(e)
        failed = self.loads.take_failed()
        with self._lock:
            self._failed_blocks |= failed
            self.stats["load_failures"] += sum(1 for m in self._step_loads if failed.intersection(m.block_ids))
            self.stats["blocks_loaded"] = self.loads.loaded
            self.tier_tokens.update(self.loads.tier_tokens)
        self._step_loads = []

    def _loads_failed(self, e: Exception) -> None:
        """The copy engine failed mid-step: every block of the step's loads is recomputed."""
        self._warn_once("device-load", "cachedattn: the step's paged loads failed (%s: %s); vLLM recomputes them", type(e).__name__, e)
        self.loads.failed.update(b for m in self._step_loads for b in m.block_ids)

    def _saved(self, req_id: str, blocks: int, failed: bool) -> None:
        with self._lock:
            self._sent.add(req_id)
            self.stats["blocks_saved"] += blocks
            self.stats["save_failures"] += int(failed)
            self._pending -= 1
            self._idle.notify_all()

    # ---- reports ------------------------------------------------------------------------

    def finished(self) -> tuple[set[str], set[str]]:
        self.finish_step()
        return super().finished()

    def failed_blocks(self) -> set[int]:
        self.finish_step()
        return super().failed_blocks()

    def close(self) -> None:
        self.finish_step()
        self.saves.close()
        super().close()
        close = getattr(self.engine, "close", None)  # the fake engine's (tests); the native one goes with it
        if close is not None:
            close()
