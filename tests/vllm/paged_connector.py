"""The connector's worker side on the GPU plan (cachedattn.vllm.device_transfers) driven as vLLM drives
the connector, on the CPU: the scheduler side's planner (synchronous loads) makes each step's plan, the
worker starts it before the forward, the forward waits for each layer and reads (or writes) the paged
blocks as attention does, and the step's reports go back to the planner. The fake copy engine stands for
the device's; under a race detector the paged tensors are device memory used by the compute stream.
Shared by tests/vllm/test_device_transfers.py and the ordering mutants (tests/transfer/
test_ordering_mutants.py, scenarios "paged_saves" and "paged_save_aborted")."""

from __future__ import annotations

import numpy as np
import torch

import cachedattn
from cachedattn.vllm.device_loads import device_store_spec
from cachedattn.vllm.device_transfers import device_transfers
from cachedattn.vllm.plan import PrefixPlanner
from cachedattn.vllm.prefix_keys import namespace

from .paged_device import B, DIM, HEADS, LAYERS, NBLOCKS


class Worker:
    """A store, the paged KV (each layer [2, blocks, B, heads, dim]), the planner and the worker."""

    def __init__(self, tmp, host_blocks: int = 64):
        self.caches = [torch.zeros(2, NBLOCKS, B, HEADS, DIM) for _ in range(LAYERS)]
        self.store = cachedattn.AttentionStore(
            host_bytes=host_blocks * LAYERS * 4096, disk_dir=str(tmp / "kv"), chunk_tokens=B,
            spec=device_store_spec(LAYERS, HEADS, DIM, torch.float32, "paged-connector-test"), hugepages="off",
        )
        self.transfers = device_transfers(self.store, self.caches, B, HEADS, DIM)
        self.planner = PrefixPlanner(namespace("paged-connector-test", "float32", "paged-cuda-nhd", B), B, sync_loads=True)
        self.reads: list[torch.Tensor] = []

    def compute_writes(self, blocks: list[int], seed: int) -> torch.Tensor:
        """A forward writing new KV into paged blocks (the compute stream); returns it [layers, 2, n, B, h, d]."""
        g = torch.Generator().manual_seed(seed)
        kv = torch.randn(LAYERS, 2, len(blocks), B, HEADS, DIM, generator=g)
        for layer in range(LAYERS):
            self.caches[layer][:, blocks] = kv[layer]
        return kv

    def step(self, read: list[int] = ()) -> tuple[set[str], set[str], set[int]]:
        """One vLLM step: the plan to the worker (start_load_kv), the forward (each layer waited for, then
        `read` blocks read by attention into self.reads), then wait_for_save, get_finished,
        get_block_ids_with_load_errors and the worker's lookup answers back to the planner."""
        self.transfers.submit(self.planner.take_step())
        self.reads = []
        for layer in range(LAYERS):
            self.transfers.wait_layer(layer)
            self.reads.append(self.caches[layer][:, list(read)] * 1)
        self.transfers.finish_step()
        sent, received = self.transfers.finished()
        failed = self.transfers.failed_blocks()
        self.planner.reported(sent, received)
        self.planner.answered(self.transfers.answers())
        return sent, received, failed

    def until_sent(self, req: str, steps: int = 50) -> None:
        """Steps (with nothing scheduled) until the worker reports req's save; raises if it never does."""
        for _ in range(steps):
            self.transfers.wait_idle(30)
            sent, _, _ = self.step()
            if req in sent:
                return
        raise AssertionError(f"the save of {req} was never reported")

    def matched(self, req: str, toks, computed: int = 0) -> int:
        """vLLM asks until the planner knows (the lookup runs on the worker, answering after its prefetch)."""
        for _ in range(50):
            n = self.planner.matched(req, toks, computed)
            if n is not None:
                return n
            self.step()
            self.transfers.wait_idle(30)
        raise AssertionError(f"no answer for {req}")

    def close(self) -> None:
        self.transfers.close()
        self.store.close()


def _equal(reads: list[torch.Tensor], kv: torch.Tensor, what: str) -> None:
    for layer in range(LAYERS):
        if not torch.equal(reads[layer], kv[layer]):
            raise AssertionError(f"{what}, layer {layer}: the loaded blocks differ from the saved KV")


def run_save_then_load(tmp) -> None:
    """A request's forward writes three blocks and a partial one; it finishes, its whole blocks are saved
    D2H (reported only once copied); vLLM hands the blocks to others (overwritten); a later request with
    that prefix loads them into other blocks during the step that schedules it, byte for byte."""
    w = Worker(tmp)
    try:
        toks = np.arange(300, 300 + 3 * B + 2)
        kv = w.compute_writes([3, 6, 1, 4], seed=1)
        if w.planner.finished("r1", toks, len(toks), [3, 6, 1, 4]) is not True:
            raise AssertionError("the finished request's blocks are not held for its save")
        w.until_sent("r1")
        if w.transfers.stats["blocks_saved"] != 3:
            raise AssertionError(f"saved {w.transfers.stats['blocks_saved']} blocks, not 3")
        w.compute_writes([3, 6, 1, 4], seed=2)  # the blocks went back to vLLM, which reuses them
        later = np.concatenate([toks[: 3 * B], np.arange(900, 900 + B)])
        n = w.matched("r2", later)
        if n != 3 * B:
            raise AssertionError(f"matched {n} tokens, not {3 * B}")
        w.planner.allocated("r2", [5, 2, 7, 0], n)
        sent, received, failed = w.step(read=[5, 2, 7])
        if received or failed:
            raise AssertionError(f"a synchronous load reported received {received}, failed {failed}")
        _equal(w.reads, kv[:, :, :3], "r2")
    finally:
        w.close()


def run_save_aborted_by_close(tmp) -> None:
    """The store closes right after a save's copies were issued (on the saving thread, before its wait):
    the aborted appends' host blocks go back only after those copies; the request is reported all the same."""
    w = Worker(tmp)
    engine, real = w.transfers.engine, w.transfers.engine.record
    closed = []

    def record(direction):
        t = real(direction)
        if direction == "d2h" and not closed:
            closed.append(True)
            w.store.close()
        return t

    engine.record = record
    try:
        toks = np.arange(40, 40 + 2 * B)
        w.compute_writes([2, 5], seed=3)
        w.planner.finished("r", toks, len(toks), [2, 5])
        w.until_sent("r")
        if not closed or w.transfers.stats["save_failures"] != 1 or w.transfers.stats["blocks_saved"]:
            raise AssertionError(f"closed {closed}, stats {w.transfers.stats}")
        w.compute_writes([2, 5], seed=4)  # the blocks went back to vLLM
    finally:
        engine.record = real
        w.close()
