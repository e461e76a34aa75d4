"""MemoryService: the living memory -- a graph of nodes and learned edges + an ANN index + writeback queue.

Where the memory lives is a ``MemoryBackend`` (``backend.py``), chosen by ``memory.backend``:
``sqlite`` (default; SQLite graph + faiss HNSW, described below) or ``postgres`` (tables +
pgvector HNSW shared by several processes, ``postgres.py``).  The policy here (similar
edges, learning rule, capacity, expansion, validation) is the same for both.

Contracts
---------
* **Source of truth** (SQLite backend) is SQLite (``graph_store``).  A write commits to SQLite first, then goes
  into the in-memory faiss index; the index is saved beside the database (``<db>.faiss`` plus
  ``<db>.faiss.json`` naming the store it belongs to) on ``save()``/``close()``.  On open the
  saved index is *reconciled* with SQLite: a missing index, one from another store or one with
  other HNSW settings is rebuilt; otherwise ids only in SQLite (written after the last save,
  e.g. before a crash) are added and ids no longer active in SQLite (evicted, archived) are
  tombstoned.  So after any crash the index matches SQLite exactly.
* **Similar edges**: ``add`` links a new node to up to ``similar_edges_k`` nearest existing nodes
  with cosine >= ``similar_edge_min_score``; the edge weight is the cosine clipped to [0, 1].
* **Edge learning** (``reinforce``), for edges with both ends in the used node set and reward
  r in [-1, 1], learning rate lr = ``edge_learning_rate``::

      r >= 0:  w <- w + lr * r * (1 - w)        (towards 1)
      r <  0:  w <- w + lr * r * w              (towards 0)

  so w stays in [0, 1].  The same rule moves each used node's ``quality``.  Edges that fall
  under ``edge_prune_below`` are deleted.
* **Decay** (``decay``): ``w <- w * (1 - edge_decay_per_day) ** days`` where days counts since
  the edge was last created/used/reinforced or last decayed; then edges under the floor are pruned.
* **Capacity**: when the store holds more than ``max_nodes`` nodes (archived included), the
  lowest-value nodes are deleted with their edges, down to ``max_nodes - max_nodes // 100``
  (the 1 % slack amortises the scan).  ``node_value`` (higher = kept)::

      value = 0.4 * quality + 0.3 * min(1, ln(1 + use_count) / ln(101)) + 0.3 * exp(-age_days / 30)

  with age measured from the last use (or creation); ties evict the oldest id first.
* **Search** excludes archived nodes; ``expand`` walks edges in both directions and skips
  archived neighbours.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import MemoryConfig
from ..errors import DimensionMismatch, MemoryStoreError
from ..graph import EDGE_TYPES, Subgraph
from .backend import MemoryBackend, SqliteBackend, open_backend
from .graph_store import GraphStore, NewNode, Node, check_edge, check_kind
from .vectors import VectorIndex
from .writeback import WritebackQueue

log = logging.getLogger(__name__)

VALUE_WEIGHTS = (0.4, 0.3, 0.3)  # quality, use, recency
VALUE_USE_SATURATION = 100  # uses at which the use term reaches 1
VALUE_RECENCY_DAYS = 30.0  # e-folding time of the recency term
EVICTION_SLACK = 0.01  # evict down to (1 - slack) * max_nodes
EXACT_KIND_SEARCH_MAX = 4096  # kind-filtered searches over at most this many nodes are exact scans


def node_value(quality: np.ndarray, use_count: np.ndarray, last_active_at: np.ndarray, now: float) -> np.ndarray:
    """Eviction score (higher = more worth keeping); see the module docstring."""
    wq, wu, wr = VALUE_WEIGHTS
    use = np.minimum(1.0, np.log1p(use_count) / math.log1p(VALUE_USE_SATURATION))
    age_days = np.maximum(0.0, now - np.asarray(last_active_at, np.float64)) / 86_400.0
    return wq * np.asarray(quality, np.float64) + wu * use + wr * np.exp(-age_days / VALUE_RECENCY_DAYS)


@dataclass
class Hit:
    node_id: int
    score: float  # cosine similarity to the query
    text: str
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    text: str
    kind: str
    metadata: dict[str, Any]
    vector: np.ndarray | None
    quality: float
    edges: list[tuple[int, str, float]]
    created_at: float
    on_written: Callable[[int], None] | None = None  # told the node's id once it is committed


class MemoryService:
    """Vector + graph memory over one backend (thread-safe; one lock serialises this process's access)."""

    def __init__(self, config: MemoryConfig, dimension: int, embedder: Any = None,
                 backend: MemoryBackend | None = None):
        if embedder is not None and int(embedder.dimension) != int(dimension):
            raise DimensionMismatch(f"embedder produces dimension {embedder.dimension} but the memory "
                                    f"dimension is {dimension}")
        self.config = config
        self.dimension = int(dimension)
        self.embedder = embedder
        self._lock = threading.RLock()
        self._writeback: WritebackQueue | None = None
        self._closed = False
        self._evicted = 0
        self.backend: MemoryBackend = backend if backend is not None else open_backend(config, self.dimension)
        if int(self.backend.dimension) != self.dimension:
            raise DimensionMismatch(f"memory backend has dimension {self.backend.dimension}, the service {dimension}")

    # the SQLite backend's parts, for tests and tools that inspect them
    def _sqlite(self) -> SqliteBackend:
        if not isinstance(self.backend, SqliteBackend):
            raise AttributeError(f"memory.backend {self.config.backend!r} has no SQLite store / faiss index")
        return self.backend

    @property
    def store(self) -> GraphStore:
        return self._sqlite().store

    @property
    def index(self) -> VectorIndex:
        return self._sqlite().index

    @property
    def index_path(self) -> Path:
        return self._sqlite().index_path

    @property
    def open_report(self) -> dict[str, Any]:
        return self.backend.open_report

    # ---- validation --------------------------------------------------------------------
    def _check_vector(self, vector: Any, what: str = "vector") -> np.ndarray:
        v = np.asarray(vector, np.float32)
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.ndim != 1:
            raise DimensionMismatch(f"{what} must be 1-D of dimension {self.dimension}, got shape {v.shape}")
        if v.shape[0] != self.dimension:
            raise DimensionMismatch(f"{what} has dimension {v.shape[0]} but the memory store dimension is {self.dimension}")
        norm = float(np.linalg.norm(v))
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError(f"{what} is zero or not finite: cannot be normalised")
        return (v / norm).astype(np.float32)

    def _pending(self, text: Any, kind: str, metadata: dict | None, vector: Any, quality: float,
                 edges: Sequence[tuple[int, str, float]] | None) -> _Pending:
        if not isinstance(text, str):
            raise TypeError(f"memory text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("memory text is empty: nothing to remember")
        check_kind(kind)
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"memory metadata must be JSON-serialisable: {e}") from None
        q = float(quality)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quality {quality!r} outside [0, 1]")
        vec = None if vector is None else self._check_vector(vector)
        if vec is None and self.embedder is None:
            raise ValueError("no vector given and the memory service has no embedder: "
                             "pass vector=... or MemoryService(..., embedder=EmbeddingService(...))")
        checked_edges = []
        for e in edges or []:
            other, type_, weight = e
            checked_edges.append((int(other), type_, check_edge(type_, weight)))
        return _Pending(text, kind, metadata, vec, q, checked_edges, time.time())

    def _ensure_open(self) -> None:
        if self._closed:
            raise MemoryStoreError(f"memory service for {self.backend.location} is closed")

    # ---- writes ------------------------------------------------------------------------
    def add(self, text: str, kind: str = "interaction", metadata: dict | None = None, vector: Any = None,
            quality: float = 0.5, edges: Sequence[tuple[int, str, float]] | None = None) -> int:
        """Store one node now (synchronously); returns its id.  Embeds `text` when `vector` is None."""
        self._ensure_open()
        item = self._pending(text, kind, metadata, vector, quality, edges)
        return self._write_batch([item])[0]

    def enqueue(self, text: str, kind: str = "interaction", metadata: dict | None = None, vector: Any = None,
                edges: Sequence[tuple[int, str, float]] | None = None, quality: float = 0.5,
                on_written: Callable[[int], None] | None = None) -> None:
        """Validate now, write later: the background worker embeds and inserts in batches, then calls
        `on_written(node_id)` (on the worker thread; an exception there is logged, the write stands)."""
        self._ensure_open()
        item = self._pending(text, kind, metadata, vector, quality, edges)
        item.on_written = on_written
        with self._lock:
            if self._writeback is None:
                self._writeback = WritebackQueue(self._write_batch, self.config.writeback_batch_size,
                                                 self.config.writeback_interval_ms)
        self._writeback.enqueue(item)

    def flush(self) -> None:
        """Block until every enqueued write is in SQLite and the index."""
        if self._writeback is not None:
            self._writeback.flush()

    def _write_batch(self, items: Sequence[_Pending]) -> list[int]:
        need = [i for i, it in enumerate(items) if it.vector is None]
        if need:  # one batched embedding call, outside the lock
            vecs = self.embedder.embed([items[i].text for i in need])
            for i, v in zip(need, vecs):
                items[i].vector = self._check_vector(v, "embedder output")
        vectors = np.stack([it.vector for it in items]).astype(np.float32)  # (n, D)
        k, floor = self.config.similar_edges_k, self.config.similar_edge_min_score
        with self._lock:
            self._ensure_open()
            available = self.backend.searchable()
            if k > 0 and available != 0:
                nb_scores, nb_ids = self.backend.ann_search(vectors, k if available is None else min(k, available))
            else:
                nb_scores = np.zeros((len(items), 0), np.float32)
                nb_ids = np.zeros((len(items), 0), np.int64)
            intra = vectors @ vectors.T  # (n, n) cosine within the batch
            ids: list[int] = []
            now = time.time()
            with self.backend.transaction():  # one commit; the SQLite backend's index follows it
                for i, it in enumerate(items):
                    candidates = [(float(s), int(j)) for s, j in zip(nb_scores[i], nb_ids[i]) if j >= 0]
                    candidates += [(float(intra[i, j]), ids[j]) for j in range(i)]
                    candidates.sort(key=lambda c: -c[0])
                    similar = [(j, "similar", min(1.0, max(0.0, s))) for s, j in candidates[:k] if s >= floor]
                    explicit = {(o, t) for o, t, _ in it.edges}
                    edges = list(it.edges) + [e for e in similar if (e[0], e[1]) not in explicit]
                    node = NewNode(it.text, it.kind, it.vector, it.metadata, it.quality, edges, it.created_at)
                    ids.extend(self.backend.insert_nodes([node], now=now))
            self._enforce_capacity(now)
        for it, node_id in zip(items, ids):
            if it.on_written is not None:
                try:
                    it.on_written(node_id)
                except Exception:  # noqa: BLE001 - the node is committed; the caller's bookkeeping failed
                    log.exception("on_written callback for node %d failed", node_id)
        return ids

    def add_edge(self, src: int, dst: int, type: str, weight: float = 0.5) -> None:
        """Create or overwrite the directed edge src -> dst of `type` (weight in [0, 1])."""
        self._ensure_open()
        with self._lock:
            self.backend.add_edge(src, dst, type, weight, time.time())

    def mark_used(self, node_ids: Sequence[int]) -> None:
        """Nodes: use_count += 1, last_used_at = now; edges among them count a use too."""
        self._ensure_open()
        with self._lock:
            self.backend.mark_used(list(node_ids), time.time())

    def set_quality(self, updates: Sequence[tuple[int, float]]) -> None:
        """Overwrite node quality (e.g. a user's rating of the answer an interaction node holds)."""
        self._ensure_open()
        with self._lock:
            self.backend.update_quality([(int(i), min(1.0, max(0.0, float(q)))) for i, q in updates])

    def update_metadata(self, node_id: int, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge `patch` into a node's metadata (top-level keys overwrite, others are kept), atomically;
        returns the merged metadata.  KeyError for a missing node."""
        self._ensure_open()
        if not isinstance(patch, dict):
            raise ValueError(f"metadata patch must be a dict, got {type(patch).__name__}")
        try:
            json.dumps(patch)
        except (TypeError, ValueError) as e:
            raise ValueError(f"memory metadata must be JSON-serialisable: {e}") from None
        with self._lock:
            return self.backend.update_metadata(int(node_id), dict(patch))

    def reinforce(self, node_ids: Sequence[int], reward: float) -> int:
        """Apply the edge learning rule (module docstring) to the edges among `node_ids` and to
        their nodes' quality; returns the number of edges updated (pruned ones excluded)."""
        self._ensure_open()
        r = float(reward)
        if not -1.0 <= r <= 1.0:
            raise ValueError(f"reward {reward!r} outside [-1, 1]")
        lr = self.config.edge_learning_rate
        ids = sorted({int(i) for i in node_ids})
        with self._lock:
            updated, _ = self.backend.reinforce(ids, r, lr, time.time(), self.config.edge_prune_below)
        return updated

    def decay(self, now: float | None = None) -> int:
        """Decay every edge by the time since it was last touched; prune under the floor; returns pruned."""
        self._ensure_open()
        with self._lock:
            return self.backend.decay_edges(self.config.edge_decay_per_day, self.config.edge_prune_below,
                                          time.time() if now is None else float(now))

    def archive(self, node_ids: Sequence[int]) -> None:
        """Keep the nodes stored but remove them from search (compression's members)."""
        self._ensure_open()
        ids = [int(i) for i in node_ids]
        with self._lock:
            self.backend.set_archived(ids, True)

    def evict(self, n: int, now: float | None = None) -> list[int]:
        """Delete the `n` lowest-value nodes (with their edges); returns their ids."""
        self._ensure_open()
        with self._lock:
            return self._evict(n, time.time() if now is None else now)

    def _evict(self, n: int, now: float) -> list[int]:
        if n <= 0:
            return []
        ids, quality, uses, last_active = self.backend.value_inputs()
        value = node_value(quality, uses, last_active, now)
        order = np.lexsort((ids, value))  # lowest value first, then oldest id
        victims = ids[order[:n]].tolist()
        self.backend.delete_nodes(victims)
        self._evicted += len(victims)
        return victims

    def _enforce_capacity(self, now: float) -> None:
        total = self.backend.count(include_archived=True)
        cap = self.config.max_nodes
        if total > cap:
            target = cap - int(cap * EVICTION_SLACK)
            self._evict(total - target, now)

    # ---- reads -------------------------------------------------------------------------
    def get(self, node_id: int) -> Node:
        with self._lock:
            return self.backend.get(node_id)

    def exists(self, node_id: int) -> bool:
        """Whether node `node_id` is in the store (archived ones too)."""
        with self._lock:
            return int(node_id) in self.backend.get_many([int(node_id)])

    def vector(self, node_id: int) -> np.ndarray:
        """(D,) float32 unit vector of a node (archived ones too)."""
        with self._lock:
            return self.backend.vectors([int(node_id)])[0]

    def count(self, kind: str | None = None, include_archived: bool = False) -> int:
        with self._lock:
            return self.backend.count(kind, include_archived)

    def nodes(self, kind: str | None = None, include_archived: bool = False) -> list[Node]:
        with self._lock:
            return self.backend.nodes(kind, include_archived)

    def edges(self, node_id: int | None = None):
        with self._lock:
            return self.backend.edges(node_id)

    def _query_vector(self, query: str | np.ndarray) -> np.ndarray:
        if isinstance(query, str):
            if not query.strip():
                raise ValueError("search query is empty")
            if self.embedder is None:
                raise ValueError("text query needs an embedder: MemoryService(..., embedder=...) or pass a vector")
            return self._check_vector(self.embedder.embed_one(query), "embedder output")
        return self._check_vector(query, "query vector")

    def search(self, query: str | np.ndarray, k: int = 5, kinds: tuple[str, ...] | None = None) -> list[Hit]:
        """Top-k nodes by cosine similarity (archived excluded), optionally only of `kinds`."""
        self._ensure_open()
        if k <= 0:
            return []
        for kind in kinds or ():
            check_kind(kind)
        q = self._query_vector(query)
        with self._lock:
            available = self.backend.searchable()  # None: unknown (PostgreSQL), see the loop's end
            if available == 0:
                return []
            if kinds is not None and sum(self.backend.count(kind) for kind in kinds) <= EXACT_KIND_SEARCH_MAX:
                return self._exact_search(q, k, kinds)
            fetch = k if kinds is None else 4 * k
            while True:
                asked = fetch if available is None else min(fetch, available)
                scores, ids = self.backend.ann_search(q[None, :], asked)
                pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
                nodes = self.backend.get_many([i for _, i in pairs])
                hits = [Hit(i, s, nodes[i].text, nodes[i].kind, nodes[i].metadata) for s, i in pairs
                        if i in nodes and not nodes[i].archived and (kinds is None or nodes[i].kind in kinds)]
                if len(hits) >= k:
                    break
                if available is None and len(pairs) < asked:
                    break  # the index returned fewer than asked: it has no more
                if available is not None and fetch >= available:
                    break
                fetch *= 4
        hits.sort(key=lambda h: -h.score)
        return hits[:k]

    def _exact_search(self, q: np.ndarray, k: int, kinds: tuple[str, ...]) -> list[Hit]:
        """Brute force over the few nodes of `kinds` (corrections, concepts): widening an ANN search
        until it finds a rare kind would read most of the index."""
        top = self.backend.exact_search(q, k, kinds)
        nodes = self.backend.get_many([i for i, _ in top])
        return [Hit(i, s, nodes[i].text, nodes[i].kind, nodes[i].metadata) for i, s in top if i in nodes]

    def expand(self, seed_ids: Sequence[int], hops: int | None = None, max_nodes: int | None = None,
               seed_scores: dict[int, float] | None = None) -> Subgraph:
        """The seeds plus their graph neighbourhood, as a `Subgraph` for graph attention.

        Breadth-first over edges in either direction, up to `hops` (default
        ``memory.expansion_hops``); each hop admits new nodes strongest edge first until
        `max_nodes` (default ``memory.expansion_max_nodes``) nodes are selected.  Seeds come first,
        ordered by `seed_scores` (descending).  Edges are those of the induced subgraph, with
        ``edge_index`` in positions of ``node_ids``.
        """
        self._ensure_open()
        hops = self.config.expansion_hops if hops is None else int(hops)
        max_nodes = self.config.expansion_max_nodes if max_nodes is None else int(max_nodes)
        if hops < 0 or max_nodes < 0:
            raise ValueError(f"hops ({hops}) and max_nodes ({max_nodes}) must be >= 0")
        seed_scores = {int(k): float(v) for k, v in (seed_scores or {}).items()}
        now = time.time()
        with self._lock:
            seeds = list(dict.fromkeys(int(i) for i in seed_ids))
            nodes = self.backend.get_many(seeds)
            seeds = [i for i in seeds if i in nodes]
            seeds.sort(key=lambda i: -seed_scores.get(i, 0.0))  # stable: ties keep the caller's order
            selected = seeds[:max_nodes]
            hop_of = {i: 0 for i in selected}
            frontier = selected
            for h in range(1, hops + 1):
                if len(selected) >= max_nodes or not frontier:
                    break
                best: dict[int, float] = {}
                for _, nb, w in self.backend.neighbours(frontier):
                    if nb not in hop_of and w > best.get(nb, -1.0):
                        best[nb] = w
                new = sorted(best, key=lambda i: (-best[i], i))[:max_nodes - len(selected)]
                for i in new:
                    hop_of[i] = h
                selected = selected + new
                frontier = new
            if not selected:
                return Subgraph.empty(self.dimension)
            nodes.update(self.backend.get_many([i for i in selected if i not in nodes]))
            vectors = self.backend.vectors(selected)
            edges = self.backend.edges_full_among(selected)
        pos = {i: p for p, i in enumerate(selected)}
        edges.sort(key=lambda e: (pos[e.src], pos[e.dst], e.type))
        type_index = {t: i for i, t in enumerate(EDGE_TYPES)}
        ns = [nodes[i] for i in selected]
        return Subgraph(
            node_ids=list(selected),
            texts=[n.text for n in ns],
            kinds=[n.kind for n in ns],
            vectors=vectors,
            seed_scores=np.asarray([seed_scores.get(i, 0.0) if hop_of[i] == 0 else 0.0 for i in selected], np.float32),
            hops=np.asarray([hop_of[i] for i in selected], np.int64),
            use_counts=np.asarray([n.use_count for n in ns], np.int64),
            ages_s=np.asarray([max(0.0, now - n.last_active_at) for n in ns], np.float32),
            quality=np.asarray([n.quality for n in ns], np.float64),  # exact: the note gate compares it
            metadata=[n.metadata for n in ns],
            edge_index=np.asarray([[pos[e.src] for e in edges], [pos[e.dst] for e in edges]], np.int64).reshape(2, -1),
            edge_weight=np.asarray([e.weight for e in edges], np.float32),
            edge_type=np.asarray([type_index[e.type] for e in edges], np.int64),
            edge_age_s=np.asarray([max(0.0, now - e.updated_at) for e in edges], np.float32),
            edge_use_count=np.asarray([e.use_count for e in edges], np.float32),
        )

    # ---- operations --------------------------------------------------------------------
    def ping(self) -> float:
        """Round-trip latency (ms) of a trivial query to the backend (and, for SQLite, an index size read)."""
        t0 = time.perf_counter()
        with self._lock:
            self._ensure_open()
            self.backend.ping()
        return (time.perf_counter() - t0) * 1000.0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._ensure_open()
            b = self.backend.stats()
            nodes = self.backend.count()
            return {
                "nodes": nodes,
                "archived": self.backend.count(include_archived=True) - nodes,
                **b,
                "dimension": self.dimension,
                "max_nodes": self.config.max_nodes,
                "evicted": self._evicted,
                "writeback": self._writeback.stats() if self._writeback else {"enqueued": 0, "written": 0,
                                                                             "pending": 0, "batches": 0},
            }

    def save(self) -> Path | None:
        """Persist what the backend keeps in memory (SQLite: the faiss index + sidecar; returns its path)."""
        with self._lock:
            self._ensure_open()
            self.backend.save()
            return self.index_path if isinstance(self.backend, SqliteBackend) else None

    def dump(self, directory: str | Path) -> dict[str, Any]:
        """A consistent copy of the memory in `directory` (the backend's own format); see ``backend.dump_memory``."""
        self.flush()
        with self._lock:
            self._ensure_open()
            return self.backend.dump(Path(directory))

    def load(self, directory: str | Path, components: dict[str, str]) -> None:
        """Replace the memory with a dump made by ``dump`` (same backend)."""
        self.flush()
        with self._lock:
            self._ensure_open()
            self.backend.load(Path(directory), components)

    def close(self) -> None:
        """Write everything pending, save the index (SQLite), close the backend (idempotent)."""
        if self._closed:
            return
        error = None
        if self._writeback is not None:
            try:
                self._writeback.close()
            except MemoryStoreError as e:
                error = e
        with self._lock:
            self._closed = True
            self.backend.close()  # SQLite: saves the index, then closes (always)
        if error is not None:
            raise error

    def __enter__(self) -> "MemoryService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; close() is the contract
        try:
            if not self._closed and self._writeback is not None:
                self._writeback.close()
        except Exception:
            pass
