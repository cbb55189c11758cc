"""Scheduler-aware fetching: what to bring from disk (or the shared remote tier) to host
memory before it is asked for.

The look-ahead window is the first `C_mem / S_kv` queued jobs (host capacity
over the mean KV size of a conversation). Their conversations' disk-only KV is
prefetched in queue order while the current job runs, after room has been made
by demoting conversations outside the window; prefetching stops at the first
conversation that does not fit in what is free minus what the running job
(or batch) still needs, so a prefetch never waits for eviction and never takes the
running jobs' memory.
"""

from __future__ import annotations


def window_size(host_capacity: int, mean_kv_bytes: float) -> int:
    """L_pw = C_mem / S_kv (0 while nothing is stored)."""
    return int(host_capacity // mean_kv_bytes) if mean_kv_bytes > 0 else 0


def plan_prefetch(window: list[str], disk_only: dict[str, int], free_bytes: int, keep_free: int) -> list[str]:
    """Conversations to prefetch, in queue order, whose disk-only bytes fit in free_bytes - keep_free."""
    budget = free_bytes - keep_free
    picks: list[str] = []
    for conv in dict.fromkeys(window):
        need = disk_only.get(conv, 0)
        if need <= 0:
            continue
        if need > budget:
            break  # queue order: a later, smaller job does not jump ahead of this one
        picks.append(conv)
        budget -= need
    return picks


def prefetch_window(store, window: list[str], running, running_need: int) -> list:
    """Makes room outside the window, then starts the prefetches; returns their futures.
    `running`: the running job's conversation, or a batch's conversations (a collection)."""
    running = {running} if isinstance(running, str) else set(running)
    window = [c for c in dict.fromkeys(window) if c not in running]
    disk_only = {c: store.residency(c)["disk_only_bytes"] for c in window}
    want = running_need + sum(disk_only.values())
    if want > store.host_free_bytes():
        store.make_host_room(want, protect=set(window) | running)
        # Demoting writes what was not on disk yet, which may have evicted some of the window from disk.
        disk_only = {c: store.residency(c)["disk_only_bytes"] for c in window}
    futures = []
    for conv in plan_prefetch(window, disk_only, store.host_free_bytes(), running_need):
        try:
            futures.append(store.prefetch(conv))
        except KeyError:
            pass  # dropped from disk meanwhile (by a write making room): nothing left to fetch
    return futures


def prefetch_remote(store, window: list[tuple[str, object]], running) -> list:
    """Starts bringing in what the remote tier holds beyond the local copy of each queued job's
    prompt ((conversation, token ids) in queue order; the running jobs' own are loading already).
    `running`: a conversation or a batch's conversations. A store without a remote tier does nothing."""
    fetch = getattr(store, "prefetch_remote", None)
    if fetch is None or getattr(getattr(store, "config", None), "remote", None) is None:
        return []
    running = {running} if isinstance(running, str) else set(running)
    return [fetch(conv, ids) for conv, ids in dict(window).items() if conv not in running]
