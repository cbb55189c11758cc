"""The index's transitions and the plans they return: no files, no threads, no pool."""

import numpy as np
import pytest

from cachedattn.store import keys
from cachedattn.store.conversation import Chunk
from cachedattn.store.eviction import LRUPolicy
from cachedattn.store.index import DiskSpace, Index, Plan
from cachedattn.store.conversation import ChunkState as S
from cachedattn.store.conversation import ConvState, IllegalTransition
from cachedattn.store.stats import StoreStats

FILE = 100


class Block:
    """A host block reference count, as HostBlock keeps it."""

    freed = 0

    def __init__(self):
        self.refs = 1

    def acquire(self):
        self.refs += 1
        return self

    def release(self):
        self.refs -= 1
        assert self.refs >= 0
        if self.refs == 0:
            Block.freed += 1


class Pool:
    def __init__(self, n):
        self.n, self.out = n, 0

    def capacity(self):
        return self.n

    def used(self):
        return self.out


@pytest.fixture
def make_index():
    made = []

    def make(disk_files=10, host=8):
        ix = Index(LRUPolicy(), StoreStats())
        ix.host = Pool(host)
        ix.disk = DiskSpace(disk_files * FILE, FILE) if disk_files else None
        ix.lock.acquire()  # transitions are called with the store lock held (the test holds it throughout)
        made.append(ix)
        return ix

    yield make
    for ix in made:
        ix.lock.release()


def save(ix, conv_id="a", n_chunks=2, state=S.HOST, first=0):
    """What a commit does: new chunks from `first` on."""
    conv = ix.get(conv_id, required=False) or ix.new_conversation(conv_id, keys.root_key("fp", conv_id))
    parent = conv.chunks[first - 1].key if first else conv.root
    gen, new = ix.next_gen(), []
    for i in range(first, first + n_chunks):
        toks = np.arange(i * 4, i * 4 + 4, dtype=np.int32)
        key = keys.chunk_key(parent, toks)
        new.append(Chunk(i, toks, key, parent, [0], state, host=Block(), gen=gen, tail=i == first + n_chunks - 1))
        parent = key
    plan = Plan()
    ix.replace_tail(conv, first, new, plan)
    return conv, new, plan


def write_all(ix, conv, plan, name="f{}"):
    """The executor's part, with every write succeeding; returns the file names published."""
    names = []
    while plan.writes or plan.queued:
        jobs, plan.writes, plan.queued = plan.writes + plan.queued, [], []
        for c_conv, c, ref in jobs:
            ref.release()
            names.append(name.format(len(names)))
            ix.written(c_conv, c, names[-1], None, plan)
    return names


def test_write_through_plans_one_write_per_chunk_and_reserves_disk(make_index):
    ix = make_index()
    conv, new, plan = save(ix)
    assert not plan
    for c in new:
        assert ix.write_through(conv, c, plan)
    assert [c for _, c, _ in plan.queued] == new and all(c.state is S.WRITING for c in new)
    assert ix.disk.used == 2 * FILE and ix.writing == 2
    write_all(ix, conv, plan)
    assert [c.state for c in new] == [S.HOST_DISK] * 2 and ix.writing == 0 and conv.writes == 0
    assert not plan.deletes


def test_a_write_ending_after_its_chunk_was_dropped_plans_its_file_deletion(make_index):
    ix = make_index()
    conv, new, plan = save(ix, n_chunks=1)
    ix.write_through(conv, new[0], plan)
    job = plan.queued.pop()
    drop = Plan()
    ix.forget(conv, drop)
    assert not drop.deletes and "a" not in ix.convs and conv.state is ConvState.GONE
    assert not drop.rmdirs  # a write is still in flight into the directory
    job[2].release()
    after = Plan()
    ix.written(conv, new[0], "late.kv", None, after)
    assert after.deletes == [(conv.dirname, "late.kv")] and after.rmdirs == [conv.dirname]
    assert ix.disk.used == 0


def test_a_failed_write_keeps_the_host_copy_and_gives_back_the_space(make_index):
    ix = make_index()
    conv, new, plan = save(ix, n_chunks=1)
    ix.write_through(conv, new[0], plan)
    _, c, ref = plan.queued.pop()
    ref.release()
    ix.written(conv, c, None, OSError(28, "No space left on device"), plan)
    assert c.state is S.HOST and c.host is not None and ix.disk.used == 0
    assert ix.disk_error and not ix.disk_usable()


def test_a_replaced_save_keeps_its_files_until_the_new_one_is_on_disk(make_index):
    ix = make_index()
    conv, old, plan = save(ix, n_chunks=2)
    for c in old:
        ix.write_through(conv, c, plan)
    write_all(ix, conv, plan, "old{}")
    _, new, plan = save(ix, n_chunks=1, first=1)  # extends the partial last chunk
    assert old[1].state is S.DROPPED and conv.superseded == ["old1"] and not plan.deletes
    ix.write_through(conv, new[0], plan)
    write_all(ix, conv, plan, "new{}")
    assert plan.deletes == [(conv.dirname, "old1")] and not conv.superseded


def test_a_lease_defers_deletions_until_it_is_released(make_index):
    ix = make_index()
    conv, new, plan = save(ix, n_chunks=2)
    for c in new:
        ix.write_through(conv, c, plan)
    write_all(ix, conv, plan)
    lease = ix.lease(conv, "load")
    cut = Plan()
    ix.truncate(conv, 1, cut)
    assert not cut.deletes and conv.doomed == ["f1"]
    done = Plan()
    ix.release(lease, done)
    assert done.deletes == [(conv.dirname, "f1")] and not conv.doomed and ix.leases == 0
    with pytest.raises(IllegalTransition):
        ix.release(lease, Plan())


def test_demoting_plans_writes_for_host_only_chunks_and_drops_copies_on_disk(make_index):
    ix = make_index()
    conv, new, plan = save(ix, n_chunks=2)
    ix.write_through(conv, new[0], plan)
    write_all(ix, conv, plan)
    demote = Plan()
    ix.demote(conv, demote, drop_unwritable=False)
    assert new[0].state is S.DISK and new[0].host is None
    assert [c for _, c, _ in demote.writes] == [new[1]] and new[1].state is S.DEMOTING
    write_all(ix, conv, demote)
    assert new[1].state is S.DISK


def test_demoting_without_disk_room_drops_only_when_asked(make_index):
    ix = make_index(disk_files=0)
    conv, new, _ = save(ix, n_chunks=2)
    plan = Plan()
    ix.demote(conv, plan, drop_unwritable=False)
    assert [c.state for c in new] == [S.HOST, S.HOST] and not plan
    ix.demote(conv, plan, drop_unwritable=True)
    assert "a" not in ix.convs and all(c.state is S.DROPPED and c.host is None for c in new)


def test_a_full_disk_evicts_the_least_recent_conversation_in_the_plan(make_index):
    ix = make_index(disk_files=2)
    a, new_a, plan = save(ix, "a", n_chunks=2)
    for c in new_a:
        ix.write_through(a, c, plan)
    write_all(ix, a, plan, "a{}")
    b, new_b, plan = save(ix, "b", n_chunks=1)
    assert ix.write_through(b, new_b[0], plan)
    assert sorted(plan.deletes) == [(a.dirname, "a0"), (a.dirname, "a1")]
    assert [c.state for c in new_a] == [S.HOST, S.HOST]  # host copies stay; the files went
    assert ix.disk.used == FILE


def test_the_last_conversation_of_a_directory_plans_its_removal_once_done(make_index):
    ix = make_index()
    conv, _, _ = save(ix)
    lease = ix.lease(conv, "load")
    plan = Plan()
    ix.forget(conv, plan)
    assert not plan.rmdirs and conv.dirname in ix.dir_users
    ix.release(lease, plan)
    assert plan.rmdirs == [conv.dirname] and conv.dirname not in ix.dir_users


def test_generations_increase(make_index):
    ix = make_index()
    ix.gen = 2**62
    assert ix.next_gen() == 2**62 + 1 < ix.next_gen()


def test_the_host_victim_is_the_least_recently_used_conversation(make_index):
    """The index keeps its conversations least recently used first: a save or load touches one."""
    ix = make_index()
    for conv_id in "abc":
        save(ix, conv_id, n_chunks=1)
    assert ix.host_victim().id == "a"
    ix.touch(ix.get("a"))  # a load of a
    assert ix.host_victim().id == "b"
    save(ix, "b", n_chunks=1, first=1)  # b saved again
    assert ix.host_victim().id == "c"
    assert list(ix.convs) == ["c", "a", "b"]
