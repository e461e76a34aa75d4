"""Writeback queue: memory writes leave the request path.

``enqueue(item)`` returns at once (it blocks only when ``max_pending`` items are waiting: back
pressure instead of unbounded growth).  One daemon worker thread collects items into batches
of up to ``batch_size`` -- waiting at most ``interval_ms`` after the first item of a batch --
and hands each batch to ``write_batch`` (one SQLite transaction, one batched embedding call).

``flush()`` blocks until every item enqueued before the call is written and re-raises a
write error as ``MemoryStoreError``; it also cuts the worker's wait short, so a reader that needs a
write (feedback on an answer whose node is still queued) waits for the write, not for the interval.
``close()`` flushes and stops the worker.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

from ..errors import MemoryStoreError

log = logging.getLogger(__name__)

_STOP = object()
_FLUSH = object()  # ends the batch being collected: write it now


class WritebackQueue:
    def __init__(self, write_batch: Callable[[Sequence[Any]], None], batch_size: int = 64,
                 interval_ms: int = 200, max_pending: int = 0):
        self.write_batch = write_batch
        self.batch_size = max(1, int(batch_size))
        self.interval_s = max(1, int(interval_ms)) / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending or 100 * self.batch_size)
        self._cond = threading.Condition()
        self._enqueued = 0
        self._done = 0  # written or failed
        self._written = 0
        self._batches = 0
        self._errors: list[BaseException] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="memory-writeback", daemon=True)
        self._thread.start()

    # ---- producer side ---------------------------------------------------------------
    def enqueue(self, item: Any) -> None:
        if self._closed:
            raise MemoryStoreError("writeback queue is closed: the memory service was closed")
        with self._cond:
            self._enqueued += 1
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued so far is written; raises the first write error since the last flush."""
        with self._cond:
            target = self._enqueued
            behind = self._done < target
        if behind:
            try:
                self._queue.put_nowait(_FLUSH)
            except queue.Full:  # a full queue makes full batches: the worker is not waiting anyway
                pass
        with self._cond:
            ok = self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)
            errors, self._errors = self._errors, []
        if errors:
            raise MemoryStoreError(f"{len(errors)} memory writeback batch(es) failed; first: {errors[0]!r}") from errors[0]
        if not ok:
            raise MemoryStoreError(f"writeback flush timed out after {timeout} s with {self.pending} item(s) pending")

    def close(self) -> None:
        """Write everything pending, then stop the worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        with self._cond:
            errors, self._errors = self._errors, []
        if errors:
            raise MemoryStoreError(f"{len(errors)} memory writeback batch(es) failed at close; first: {errors[0]!r}") from errors[0]

    @property
    def pending(self) -> int:
        return self._enqueued - self._done

    def stats(self) -> dict[str, int]:
        return {"enqueued": self._enqueued, "written": self._written, "pending": self.pending,
                "batches": self._batches}

    # ---- worker ----------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            if first is _FLUSH:
                continue
            batch = [first]
            deadline = time.monotonic() + self.interval_s
            while len(batch) < self.batch_size:
                try:
                    # drain what is already there without waiting; then wait up to the interval
                    item = self._queue.get_nowait() if self._queue.qsize() else \
                        self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if item is _FLUSH:
                    break
                batch.append(item)
            self._write(batch)

    def _write(self, batch: list) -> None:
        try:
            self.write_batch(batch)
            ok = True
        except BaseException as e:  # keep the worker alive; flush() reports it
            log.exception("memory writeback batch of %d failed", len(batch))
            ok = False
            with self._cond:
                self._errors.append(e)
        with self._cond:
            self._done += len(batch)
            if ok:
                self._written += len(batch)
            self._batches += 1
            self._cond.notify_all()
