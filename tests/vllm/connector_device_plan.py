"""CachedAttnConnector itself on the GPU plan, both roles driven as vLLM's scheduler and worker drive
them, without an engine: a vLLM config whose device is CUDA, the paged KV as CPU tensors in the CUDA
layout and the fake copy engine (CACHEDATTN_FAKE_COPY_ENGINE=1). Run by tests/vllm/test_connector_device_plan.py
in the vLLM environment's Python; prints RESULT ok or raises."""

from __future__ import annotations

import os
import sys
import tempfile
from types import SimpleNamespace

os.environ["CACHEDATTN_FAKE_COPY_ENGINE"] = "1"

import torch  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from cachedattn.vllm.connector import CachedAttnConnector  # noqa: E402
from cachedattn.vllm.device_transfers import DeviceTransfers  # noqa: E402
from cachedattn.vllm.transfers import PagedTransfers  # noqa: E402

B, H, D, L, NB = 16, 2, 8, 3, 12
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(L)]


def config(tmp: str, device: str):
    model = os.path.join(tmp, "model")  # the same weights for both devices
    os.makedirs(model, exist_ok=True)
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"weights")):
        with open(os.path.join(model, name), "wb") as f:
            f.write(data)
    extra = {"host_bytes": "16M", "disk_dir": os.path.join(tmp, "kv")}
    kv = KVTransferConfig(kv_connector="CachedAttnConnector", kv_role="kv_both", kv_connector_extra_config=extra)
    vllm = SimpleNamespace(
        parallel_config=SimpleNamespace(world_size=1), model_config=SimpleNamespace(model=model),
        device_config=SimpleNamespace(device_type=device), kv_transfer_config=kv,
    )
    spec = FullAttentionSpec(block_size=B, num_kv_heads=H, head_size=D, dtype=torch.float32)
    return vllm, SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=NAMES, kv_cache_spec=spec)])


def step(sched, worker, caches, read=()):
    """One vLLM step: metadata down, start_load_kv, each layer waited for and read, then the reports up."""
    worker.bind_connector_metadata(sched.build_connector_meta(None))
    worker.start_load_kv(None)
    reads = []
    for name in NAMES:
        worker.wait_for_layer_load(name)
        reads.append(caches[name][:, list(read)].clone())
    worker.wait_for_save()
    sent, received = worker.get_finished(set())
    failed = worker.get_block_ids_with_load_errors()
    out = SimpleNamespace(finished_sending=sent, finished_recving=received,
                          kv_connector_worker_meta=worker.build_connector_worker_meta())
    sched.update_connector_output(out)
    worker.clear_connector_metadata()
    return sent or set(), received or set(), failed, reads


def request(req_id, toks):
    return SimpleNamespace(request_id=req_id, all_token_ids=list(toks), num_tokens=len(toks), num_computed_tokens=len(toks))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vllm, kcc = config(tmp, "cuda")
        sched = CachedAttnConnector(vllm, KVConnectorRole.SCHEDULER, kcc)
        cpu_sched = CachedAttnConnector(config(os.path.join(tmp, "cpu"), "cpu")[0], KVConnectorRole.SCHEDULER, kcc)
        if sched.planner.ns == cpu_sched.planner.ns:
            raise AssertionError("the CUDA layout's keys equal the CPU layout's")
        worker = CachedAttnConnector(vllm, KVConnectorRole.WORKER, kcc)
        try:
            try:
                worker.register_kv_caches({n: torch.zeros(NB, H, B, 2 * D) for n in NAMES})  # the CPU layout
                raise AssertionError("the CPU layout was accepted on the GPU plan")
            except ValueError as e:
                if "[2, blocks, 16, 2, 8]" not in str(e):
                    raise
            caches = {n: torch.zeros(2, NB, B, H, D) for n in NAMES}
            worker.register_kv_caches(caches)
            if type(worker.transfers) is not DeviceTransfers or worker.store.spec.layers[0] != (1, H * D):
                raise AssertionError(f"{type(worker.transfers).__name__}, spec {worker.store.spec.layers[0]}")
            g = torch.Generator().manual_seed(1)
            for n in NAMES:
                caches[n][:, [3, 6, 1]] = torch.randn(2, 3, B, H, D, generator=g)
            saved = {n: caches[n][:, [3, 6]].clone() for n in NAMES}
            toks = list(range(100, 100 + 2 * B + 5))
            hold, _ = sched.request_finished(request("r1", toks), ([3, 6, 1],))
            if hold is not True:
                raise AssertionError("the blocks of a finished request are not held for its save")
            for _ in range(100):
                sent, *_ = step(sched, worker, caches)
                if "r1" in sent:
                    break
                worker.transfers.wait_idle(30)
            else:
                raise AssertionError("the save was never reported")
            for n in NAMES:
                caches[n].zero_()  # vLLM reuses the freed blocks
            r2 = request("r2", toks[: 2 * B] + [7, 8, 9])
            for _ in range(100):
                n, load_async = sched.get_num_new_matched_tokens(r2, 0)
                if n is not None:
                    break
                step(sched, worker, caches)
                worker.transfers.wait_idle(30)
            if (n, load_async) != (2 * B, False):
                raise AssertionError(f"matched {(n, load_async)}, not {(2 * B, False)}: loads on the GPU plan are synchronous")
            sched.update_state_after_alloc(r2, SimpleNamespace(get_block_ids=lambda: ([9, 4, 0],)), n)
            sent, received, failed, reads = step(sched, worker, caches, read=[9, 4])
            if received or failed:
                raise AssertionError(f"received {received}, failed {failed}")
            for i, name in enumerate(NAMES):
                if not torch.equal(reads[i], saved[name]):
                    raise AssertionError(f"layer {i}: the loaded blocks differ from the saved ones")
            stats = worker.get_kv_connector_stats()
            if not stats or stats.data.get("blocks_loaded") != 2:
                raise AssertionError(f"stats {stats and stats.data}")
        finally:
            worker.shutdown()
            sched.shutdown()
            cpu_sched.shutdown()
    print("RESULT ok")


if __name__ == "__main__":
    sys.exit(main())
