"""The writeback queue: flush() writes what is waiting now instead of at the end of the batching interval."""
from __future__ import annotations

from ruvllm_lab.memory.writeback import WritebackQueue


def test_flush_cuts_the_batching_wait_short_and_keeps_order():
    written: list[int] = []

    def write(batch):
        written.extend(batch)

    q = WritebackQueue(write, batch_size=64, interval_ms=3_600_000)  # an hour of waiting for company
    try:
        for i in range(5):
            q.enqueue(i)
        q.flush(timeout=60)  # raises MemoryStoreError on timeout: the hour-long wait was not cut short
        assert written == [0, 1, 2, 3, 4] and q.stats()["pending"] == 0
        q.enqueue(5)
        q.flush(timeout=60)
        assert written == [0, 1, 2, 3, 4, 5]
        q.flush(timeout=60)  # nothing waiting: returns at once, and the worker survives the marker
        q.enqueue(6)
        q.flush(timeout=60)
        assert written[-1] == 6
    finally:
        q.close()
