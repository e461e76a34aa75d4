"""Approximate nearest-neighbour search: faiss ``IndexHNSWFlat`` behind ``IndexIDMap2``.

Vectors are unit-norm, the metric is inner product, so a score is the cosine similarity.
``M`` (``memory.hnsw_m``) and ``efConstruction`` are fixed at build time; ``efSearch`` is
applied per search (raised to ``k`` when ``k`` is larger, since HNSW cannot return more
than ``efSearch`` results).

Deletion: HNSW cannot remove points, so removal is a **tombstone set** excluded from every
search through a faiss ``IDSelectorNot(IDSelectorBatch(tombstones))``; when tombstones
exceed ``REBUILD_FRACTION`` of the index, the index is rebuilt from its own stored vectors
without them.  Tombstones are not saved: on open, ``MemoryService`` reconciles the loaded
index with SQLite (ids only in the index become tombstones, ids only in SQLite are added).
"""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from ..errors import DimensionMismatch

REBUILD_FRACTION = 0.2  # compact when more than this share of the index is tombstoned


def index_path_for(db_path: str | os.PathLike) -> Path:
    """The faiss file saved beside the SQLite store: ``memory.db`` -> ``memory.db.faiss``."""
    return Path(f"{db_path}.faiss")


class VectorIndex:
    def __init__(self, dimension: int, m: int = 16, ef_construction: int = 100, ef_search: int = 32,
                 threads: int = 0, _index: faiss.IndexIDMap2 | None = None):
        """`threads`: OpenMP threads of this index's adds and searches (``memory.index_threads``; 0 =
        OpenMP's default).  Set per call, since OpenMP keeps the setting per calling thread."""
        self.dimension = int(dimension)
        self.threads = int(threads)
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.index = _index if _index is not None else self._empty()
        self.tombstones: set[int] = set()

    def _limit_threads(self) -> None:
        if self.threads > 0:
            faiss.omp_set_num_threads(self.threads)

    def _empty(self) -> faiss.IndexIDMap2:
        hnsw = faiss.IndexHNSWFlat(self.dimension, self.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        hnsw.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(hnsw)

    # ---- size ------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Points stored, tombstones included."""
        return int(self.index.ntotal)

    def __len__(self) -> int:
        """Searchable points."""
        return self.ntotal - len(self.tombstones)

    def stored_ids(self) -> np.ndarray:
        """(ntotal,) int64 ids held by faiss, tombstones included."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def ids(self) -> np.ndarray:
        """(len,) int64 searchable ids."""
        stored = self.stored_ids()
        if not self.tombstones:
            return stored
        return stored[~np.isin(stored, np.fromiter(self.tombstones, np.int64))]

    def size_bytes(self) -> int:
        """In-memory estimate: float32 vectors + ids + level-0 links (2M int32) + upper levels (~M/ (M-1))."""
        n = self.ntotal
        return int(n * (4 * self.dimension + 8 + 4 * 2 * self.m * (1 + 1 / max(1, self.m - 1))))

    # ---- writes ----------------------------------------------------------------------
    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.shape[1] != self.dimension:
            raise DimensionMismatch(f"vector dimension {vectors.shape[1]} does not match the index dimension {self.dimension}")
        return vectors

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (n,) int64 ids with (n, D) unit vectors; an id already searchable is an error."""
        vectors = self._check(vectors)
        ids = np.ascontiguousarray(ids, np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        revived = self.tombstones.intersection(ids.tolist())
        if revived:  # re-adding a removed id (un-archive): compact first so the id is unique again
            self.rebuild()
        self._limit_threads()
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids) -> None:
        """Tombstone ids (unknown ids are ignored); compacts when tombstones pass REBUILD_FRACTION."""
        stored = set(self.stored_ids().tolist())
        self.tombstones.update(int(i) for i in ids if int(i) in stored)
        if self.tombstones and len(self.tombstones) > REBUILD_FRACTION * max(1, self.ntotal):
            self.rebuild()

    def rebuild(self) -> None:
        """A fresh HNSW graph over the searchable points (drops tombstones)."""
        keep_ids = self.ids()
        vectors = self.reconstruct(keep_ids) if len(keep_ids) else np.zeros((0, self.dimension), np.float32)
        self.index = self._empty()
        self.tombstones = set()
        if len(keep_ids):
            self._limit_threads()
            self.index.add_with_ids(vectors, keep_ids)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n, D) stored vectors of the given ids."""
        return np.stack([self.index.reconstruct(int(i)) for i in ids]).astype(np.float32)

    # ---- search ----------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (q, k) float32, ids (q, k) int64); missing results are id -1, score -inf."""
        queries = self._check(queries)
        k = int(k)
        if k <= 0 or len(self) == 0:
            return (np.full((len(queries), max(k, 0)), -np.inf, np.float32),
                    np.full((len(queries), max(k, 0)), -1, np.int64))
        sel = None
        if self.tombstones:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64)))
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        if sel is not None:
            params.sel = sel
        self._limit_threads()
        scores, ids = self.index.search(queries, k, params=params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    # ---- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves a torn index file."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, dimension: int, m: int, ef_construction: int,
             ef_search: int, threads: int = 0) -> "VectorIndex | None":
        """The saved index, or None when it is missing, unreadable or built with other settings."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except Exception:
            return None
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dimension:
            return None
        inner = faiss.downcast_index(index.index)
        if not isinstance(inner, faiss.IndexHNSWFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        # M is the number of level>0 neighbours; level 0 keeps 2M
        if int(inner.hnsw.nb_neighbors(1)) != m:
            return None
        inner.hnsw.efSearch = ef_search
        return cls(dimension, m, ef_construction, ef_search, threads, _index=index)


def clustered_unit_vectors(n: int, dimension: int, clusters: int = 100, spread: float = 1.0,
                           seed: int = 0) -> np.ndarray:
    """(n, dimension) float32 unit vectors around `clusters` random unit centres (synthetic memory
    for recall tests and benchmarks): centre + noise of expected norm `spread`, then normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dimension)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dimension)).astype(np.float32) / np.sqrt(dimension)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
