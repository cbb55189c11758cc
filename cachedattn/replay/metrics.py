"""Per-system figures from a replay's job records.

Measured: TTFT (wall time from the start of a turn to its first token, loads
included; in a batch, to the batch's first token), prefill throughput (prompt
tokens, history included, over the summed TTFTs: a per-job figure, a batch's
TTFT counted once per job) and throughput (the same prompt tokens over the
summed TTFT of each run, a batch counted once: what batching changes; equal to
prefill throughput at max_batch 1). Answers are fed, not decoded, so decode is
not measured: modelled throughput is prompt and answer tokens over the
modelled busy time, decode included. Modelled (virtual clock): queue wait, busy time, makespan and the
cost built on them. Hit rates are token-weighted over the history an unlimited
cache would reuse: host / disk = reused tokens found in that tier, miss =
the rest (recomputed). Cost: the paper's prices applied to the modelled busy
time (all of it, and the prefill part alone, which is what caching changes;
decode time is the same for every system) and to the capacity of each tier
held over the makespan.
"""

from __future__ import annotations

import numpy as np

# The paper's price model (USD).
GPU_PER_HOUR = 5.0
DRAM_PER_GB_HOUR = 0.0088
SSD_PER_GB_HOUR = 0.000082


def summarize(result, host_bytes: int, disk_bytes: int) -> dict:
    recs = result.records
    ttft = np.array([r["ttft"] for r in recs])
    wait = np.array([r["wait"] for r in recs])
    reusable = sum(r["reusable"] for r in recs)
    host = sum(min(r["host_tokens"], r["reusable"]) for r in recs)
    disk = sum(min(r["disk_tokens"], max(0, r["reusable"] - r["host_tokens"])) for r in recs)
    prompt = sum(r["prompt_tokens"] for r in recs)
    tokens = prompt + sum(r["answer_tokens"] for r in recs)
    # One entry per run (a batch's jobs share its id, its TTFT and its run time).
    runs = {r.get("batch", -1 - i): (r["ttft"], r.get("run_seconds") or 0.0, r.get("batch_size", 1))
            for i, r in enumerate(recs)}
    run_ttft = float(sum(t for t, _, _ in runs.values()))
    st = result.stats
    hours = result.makespan / 3600
    uses_store = result.system.save
    cost_gpu = GPU_PER_HOUR * result.busy / 3600
    prefill_busy = float(sum(r["modelled_prefill"] for r in recs))
    cost_dram = DRAM_PER_GB_HOUR * host_bytes / 1e9 * hours if uses_store else 0.0
    cost_ssd = SSD_PER_GB_HOUR * disk_bytes / 1e9 * hours if uses_store else 0.0
    return dict(
        system=result.system.name,
        description=result.system.description,
        jobs=len(recs),
        ttft_mean=float(ttft.mean()),
        ttft_p50=float(np.percentile(ttft, 50)),
        ttft_p99=float(np.percentile(ttft, 99)),
        prefill_throughput=prompt / float(ttft.sum()),
        throughput=prompt / run_ttft if run_ttft else None,
        throughput_modelled=tokens / result.busy if result.busy else None,
        run_time_measured=float(sum(s for _, s, _ in runs.values())),
        batch_mean=float(np.mean([b for _, _, b in runs.values()])) if runs else 1.0,
        prompt_tokens=prompt,
        computed_tokens=sum(r["computed"] for r in recs),
        reusable_tokens=reusable,
        hit_rate=(host + disk) / reusable if reusable else None,
        hit_host=host / reusable if reusable else None,
        hit_disk=disk / reusable if reusable else None,
        miss=1 - (host + disk) / reusable if reusable else None,
        host_share_of_hits=host / (host + disk) if host + disk else None,
        dropped_tokens=sum(r["dropped"] for r in recs),
        bytes_host_read=st["host"]["bytes_read"],
        bytes_host_written=st["host"]["bytes_written"],
        bytes_disk_read=st["disk"]["bytes_read"],
        bytes_disk_written=st["disk"]["bytes_written"],
        host_evictions=st["host"]["evictions"],
        disk_evictions=st["disk"]["evictions"],
        prefetched_chunks=st["host"]["prefetches"],
        compute_time_measured=float(ttft.sum()),
        busy_time_modelled=result.busy,
        prefill_time_modelled=prefill_busy,
        makespan_modelled=result.makespan,
        wait_mean_modelled=float(wait.mean()),
        queue_mean=float(np.mean(result.queue_lengths)) if result.queue_lengths else 0.0,
        queue_max=int(max(result.queue_lengths, default=0)),
        cost_usd=cost_gpu + cost_dram + cost_ssd,
        cost_breakdown=dict(gpu=cost_gpu, dram=cost_dram, ssd=cost_ssd),
        # The part cachedattn changes: accelerator time spent in prefill, plus the memory and disk it keeps.
        cost_prefill_usd=GPU_PER_HOUR * prefill_busy / 3600 + cost_dram + cost_ssd,
    )
