"""HNSW recall against exact search (real faiss), at the configured server-cpu settings."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from ruvllm_lab.config import Config, MemoryConfig
from ruvllm_lab.memory import MemoryService, VectorIndex
from ruvllm_lab.memory.vectors import clustered_unit_vectors

ROOT = Path(__file__).resolve().parent.parent


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    return flat.search(queries, k)[1]


@pytest.mark.slow
def test_recall_at_10_on_20k_vectors_at_server_cpu_settings():
    mem = Config.load(ROOT / "configs" / "server-cpu.toml").memory
    data = clustered_unit_vectors(20_000 + 200, 384, clusters=200, seed=3)
    base, queries = data[:20_000], data[20_000:]
    index = VectorIndex(384, mem.hnsw_m, mem.hnsw_ef_construction, mem.hnsw_ef_search)
    index.add(np.arange(20_000, dtype=np.int64), base)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, exact_top_k(base, queries, 10)) >= 0.95


def test_recall_through_the_service_with_tombstones(tmp_path):
    cfg = MemoryConfig(db_path=str(tmp_path / "m.db"), similar_edges_k=0, hnsw_m=32,
                       hnsw_ef_construction=200, hnsw_ef_search=64)
    data = clustered_unit_vectors(2_000 + 50, 64, clusters=40, seed=5)
    base, queries = data[:2_000], data[2_000:]
    with MemoryService(cfg, 64) as m:
        ids = np.asarray([m.add(f"n{i}", vector=v) for i, v in enumerate(base)])
        m.archive(ids[::10].tolist())  # 10 % tombstones: below the rebuild threshold
        assert len(m.index.tombstones) == 200
        keep = np.ones(len(base), bool)
        keep[::10] = False
        exact = ids[keep][exact_top_k(base[keep], queries, 10)]
        found = np.asarray([[h.node_id for h in m.search(q, k=10)] for q in queries])
    assert recall_at_k(found, exact) >= 0.95
