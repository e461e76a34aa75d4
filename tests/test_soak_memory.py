"""Issue 14, memory per query: what a long-running server keeps is bounded by config, and the
process can say where its memory is (benches/soak.py reads that breakdown from /v1/metrics)."""
from __future__ import annotations

import ctypes.util
import sqlite3
import threading

import numpy as np
import pytest

from ruvllm_lab.config import Config
from ruvllm_lab.errors import RequestNotFound
from ruvllm_lab.learning.service import Interaction, LearningService
from ruvllm_lab.memory import MemoryService
from ruvllm_lab.memory.vectors import clustered_unit_vectors
from ruvllm_lab.orchestrator import RuvLLM
from ruvllm_lab.records import RequestLog
from ruvllm_lab.router import RouterInput, make_router
from ruvllm_lab.telemetry import Metrics, process_memory, release_free_heap
from ruvllm_lab.types import Feedback, Request

from .conftest import ROOT

D = 16
TIERS = ["smollm2-135m", "qwen2.5-coder-0.5b"]


def _service(tmp_path, **overrides) -> LearningService:
    cfg = Config.from_dict({}, {"inference.models": TIERS, "system.data_dir": str(tmp_path / "state"),
                                "router.hidden_dim": 8, "learning.min_examples": 8, **overrides})
    return LearningService(cfg, make_router("fastgrnn", TIERS, cfg.router, D), resume=False, persist=False)


def _x() -> RouterInput:
    return RouterInput(np.ones(D, np.float32), 10, 0.0, 0, 0.0, 0, {}, None, None)


# ---- the learning service's in-memory window ---------------------------------------------------------
def test_recent_window_is_bounded_and_feedback_on_a_pending_answer_merges_into_it(tmp_path):
    svc = _service(tmp_path, **{"learning.recent_interactions": 3})
    for i in range(10):
        svc.record(Interaction(f"r{i}", _x()))
    assert list(svc._recent) == ["r7", "r8", "r9"]  # the window, not every answer
    assert svc.pending == 10
    # r0 left the window but waits for the next cycle: its feedback joins it, no second example
    inter = svc.add_feedback("r0", TIERS[0], rating=5)
    assert inter.request_id == "r0" and inter.signals[TIERS[0]] == {"rating": 5}
    assert svc.pending == 10
    assert svc.learn()["new_examples"] == 1
    # drained and outside the window: the caller (RuvLLM.feedback) rebuilds it from the request log
    with pytest.raises(RequestNotFound, match="last 3"):
        svc.add_feedback("r1", TIERS[0], rating=5)
    svc.add_feedback("r9", TIERS[1], rating=1)  # still in the window after the cycle
    assert svc.pending == 1


def test_with_learning_disabled_nothing_is_queued_that_no_cycle_would_drain(tmp_path):
    svc = _service(tmp_path, **{"learning.enabled": False})
    for i in range(50):
        svc.record(Interaction(f"r{i}", _x(), tier_scores={TIERS[0]: 1.0}))
    assert svc.pending == 0 and not svc._recent
    assert svc.tier_quality() == {TIERS[0]: pytest.approx(1.0)}  # the routing feature still follows the scores


def test_a_full_learning_queue_starts_a_cycle_before_the_interval(tmp_path):
    svc = _service(tmp_path, **{"learning.max_pending": 5, "learning.training_interval_ms": 3_600_000})
    stop, due = threading.Event(), []
    waiter = threading.Thread(target=lambda: due.append(svc.wait_for_cycle(stop)))
    waiter.start()
    for i in range(4):
        svc.record(Interaction(f"r{i}", _x()))
    assert not due  # four waiting, the hour not over: no cycle yet (the waiter is still blocked)
    svc.record(Interaction("r4", _x()))
    waiter.join(60)  # a guard against a hang, not a speed assertion
    assert due == [True]
    svc.learn()
    stop.set()
    assert svc.wait_for_cycle(stop) is False  # stopping ends the wait


@pytest.mark.slow
def test_feedback_on_an_answer_outside_the_window_is_rebuilt_from_the_request_log(tmp_path):
    cfg = Config.load(ROOT / "configs" / "edge.toml", overrides={
        "memory.db_path": str(tmp_path / "memory.db"), "system.data_dir": str(tmp_path / "state"),
        "learning.recent_interactions": 1, "learning.min_examples": 100})
    with RuvLLM(cfg) as llm:
        first = llm.query_with(Request(query="What is 2 + 2?", constraints={"max_tokens": 4}))
        llm.query_with(Request(query="Name a primary colour.", constraints={"max_tokens": 4}))
        llm.learn()  # drains both: only the second stays in the window
        assert "ruvllm_learning_cycles_total 1.0" in llm.metrics.render().decode()
        assert first.request_id not in llm.learning._recent
        llm.feedback(Feedback(first.request_id, rating=5))
        queued = [i for i in llm.learning._pending if i.request_id == first.request_id]
        assert len(queued) == 1
        assert queued[0].tier_scores == {"smollm2-135m": 1.0}  # rating 5 on the rating scale
        assert queued[0].x.query_tokens == llm.embedder.count_tokens("What is 2 + 2?")
        assert np.allclose(queued[0].x.query_vec, llm.embedder.embed_one("What is 2 + 2?"), atol=1e-6)


# ---- SQLite page caches -------------------------------------------------------------------------------
def _cache_size(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA cache_size").fetchone()[0]


def test_sqlite_page_caches_follow_config(tmp_path):
    cfg = Config.from_dict({}, {"memory.db_path": str(tmp_path / "m.db"), "memory.sqlite_cache_kb": 300})
    with MemoryService(cfg.memory, dimension=D) as mem:
        assert _cache_size(mem.store.conn) == -300  # negative: KiB
    log = RequestLog(tmp_path / "requests.db", keep=10, cache_kb=100)
    try:
        assert _cache_size(log._conn) == -100
    finally:
        log.close()


def _sqlite_growth_reading_a_store(tmp_path, name: str, cache_kb: int) -> int:
    """Bytes SQLite holds after writing and reading back 2000 nodes (~3 MB of vectors) in a fresh store."""
    cfg = Config.from_dict({}, {"memory.db_path": str(tmp_path / f"{name}.db"), "memory.sqlite_cache_kb": cache_kb,
                                "memory.similar_edges_k": 0})
    vecs = clustered_unit_vectors(2000, 384, seed=1)
    before = process_memory()["sqlite"]
    with MemoryService(cfg.memory, dimension=384) as mem:
        for start in range(0, len(vecs), 500):
            mem._write_batch([mem._pending(f"note {i}", "document", None, vecs[i], 0.5, None)
                              for i in range(start, start + 500)])
        mem.backend.vectors(list(range(1, 2001)))  # every page of the store read once
        held = process_memory()["sqlite"] - before
    return held


@pytest.mark.skipif("sqlite" not in process_memory(), reason="SQLite's allocation counter is not reachable here")
def test_the_memory_stores_page_cache_is_what_bounds_sqlites_memory(tmp_path):
    small = _sqlite_growth_reading_a_store(tmp_path, "small", cache_kb=256)
    large = _sqlite_growth_reading_a_store(tmp_path, "large", cache_kb=8192)
    assert small < large  # the store is larger than the small cache: the cache size is the bound
    assert small < 2 * 256 * 1024  # cache pages plus their headers, the schema and statements


# ---- where the memory is ------------------------------------------------------------------------------
def test_metrics_export_the_process_memory_breakdown():
    parts = process_memory()
    assert {"rss_anon", "rss_file"} <= parts.keys()  # Linux
    text = Metrics(limit_bytes=2**30).render().decode()
    for part in parts:
        assert f'ruvllm_process_memory_bytes{{part="{part}"}}' in text


def _rss_anon() -> int:
    return process_memory()["rss_anon"]


@pytest.mark.skipif(not ctypes.util.find_library("c") or "malloc_in_use" not in process_memory(),
                    reason="glibc's malloc_trim/mallinfo2 only")
def test_release_free_heap_hands_freed_heap_pages_back():
    blocks = [bytearray(4096) for _ in range(50_000)]  # ~200 MB of heap chunks (above pymalloc's 512 B)
    for b in blocks:
        b[0] = 1
    keep = bytearray(4096)  # allocated after them: the freed chunks are not at the heap's top
    del blocks
    held = _rss_anon()
    assert release_free_heap()
    assert held - _rss_anon() > 100 * 2**20  # most of the 200 MB left the resident set
    del keep
