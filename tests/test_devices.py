"""The GPU slot allocator never hands one slot to two live processes."""

import multiprocessing as mp
import time

import pytest

from actsparse.devices import gpu_slot


def _worker(lock_dir, n_slots, hold, queue, claimed=None):
    with gpu_slot(n_slots, lock_dir, poll_seconds=0.01) as slot:
        start = time.monotonic()
        if claimed is not None:
            claimed.set()
        time.sleep(hold)
        queue.put((slot, start, time.monotonic()))


def test_concurrent_processes_never_share_a_slot(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, 2, 0.2, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    intervals = [queue.get(timeout=5) for _ in procs]
    assert {slot for slot, _, _ in intervals} == {0, 1}
    for slot in (0, 1):
        spans = sorted((s, e) for sl, s, e in intervals if sl == slot)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"slot {slot} held by two processes at once"


def test_slot_is_freed_when_its_holder_dies(tmp_path):
    ctx = mp.get_context("fork")
    claimed = ctx.Event()
    holder = ctx.Process(target=_worker, args=(tmp_path, 1, 60, ctx.Queue(), claimed))
    holder.start()
    assert claimed.wait(timeout=60)
    with pytest.raises(TimeoutError):
        with gpu_slot(1, tmp_path, poll_seconds=0.05, timeout=0.3):
            pass
    holder.kill()
    holder.join()
    with gpu_slot(1, tmp_path, poll_seconds=0.05, timeout=5) as slot:
        assert slot == 0


def test_slots_are_reused_in_one_process(tmp_path):
    with gpu_slot(2, tmp_path) as first:
        with gpu_slot(2, tmp_path) as second:
            assert {first, second} == {0, 1}
    with gpu_slot(2, tmp_path) as again:
        assert again == 0
