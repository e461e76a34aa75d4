"""SQLite graph store: the source of truth for memory nodes, their vectors and their edges.

Schema (WAL journal, ``synchronous = NORMAL``: a committed transaction survives a process
crash; every multi-row write is one transaction, so a crash mid-write leaves the previous
consistent state)::

    meta(key PRIMARY KEY, value)                        -- dimension, schema_version
    nodes(id INTEGER PRIMARY KEY AUTOINCREMENT,         -- ids are never reused
          text, kind, metadata JSON, created_at, last_used_at, use_count, quality,
          archived 0/1, vector BLOB float32[dimension])
    edges(src, dst, type, weight in [0, 1], use_count, created_at,
          updated_at,                                    -- last created/used/reinforced
          decayed_at,                                    -- last time decay() was applied
          PRIMARY KEY (src, dst, type))                  -- deleted with either node (ON DELETE CASCADE)

Timestamps are Unix seconds (float).  The store is not thread-safe by itself: the caller
(``MemoryService``) serialises access with one lock.
"""
from __future__ import annotations

import json
import math
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import DimensionMismatch, MemoryStoreError
from ..graph import EDGE_TYPES, NODE_KINDS

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    kind TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    last_used_at REAL,
    use_count INTEGER NOT NULL DEFAULT 0,
    quality REAL NOT NULL DEFAULT 0.5,
    archived INTEGER NOT NULL DEFAULT 0,
    vector BLOB NOT NULL
);
-- counts by kind and activity read this small index, never the rows (vectors and texts are large)
CREATE INDEX IF NOT EXISTS nodes_archived_kind ON nodes(archived, kind);
CREATE TABLE IF NOT EXISTS edges (
    src INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    dst INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    type TEXT NOT NULL,
    weight REAL NOT NULL,
    use_count INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    decayed_at REAL NOT NULL,
    PRIMARY KEY (src, dst, type)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_dst ON edges(dst);
"""


@dataclass
class Node:
    id: int
    text: str
    kind: str
    metadata: dict[str, Any]
    created_at: float
    last_used_at: float | None
    use_count: int
    quality: float
    archived: bool

    @property
    def last_active_at(self) -> float:
        """Last use, or creation for a node never used."""
        return self.last_used_at if self.last_used_at is not None else self.created_at


@dataclass
class Edge:
    src: int
    dst: int
    type: str
    weight: float
    use_count: int
    created_at: float
    updated_at: float


@dataclass
class NewNode:
    """A node to insert; `edges` are (other_id, type, weight) from this node to existing ones."""
    text: str
    kind: str
    vector: np.ndarray  # (D,) float32, unit norm
    metadata: dict[str, Any] = field(default_factory=dict)
    quality: float = 0.5
    edges: list[tuple[int, str, float]] = field(default_factory=list)
    created_at: float | None = None


def check_kind(kind: str) -> str:
    if kind not in NODE_KINDS:
        raise ValueError(f"unknown node kind {kind!r}; allowed: {', '.join(NODE_KINDS)}")
    return kind


def check_edge(type_: str, weight: float) -> float:
    if type_ not in EDGE_TYPES:
        raise ValueError(f"unknown edge type {type_!r}; allowed: {', '.join(EDGE_TYPES)}")
    w = float(weight)
    if not (0.0 <= w <= 1.0) or math.isnan(w):
        raise ValueError(f"edge weight {weight!r} outside [0, 1]")
    return w


def _row_to_node(row: Sequence[Any]) -> Node:
    id_, text, kind, metadata, created, last_used, uses, quality, archived = row
    return Node(int(id_), text, kind, json.loads(metadata), float(created),
                None if last_used is None else float(last_used), int(uses), float(quality), bool(archived))


_NODE_COLS = "id, text, kind, metadata, created_at, last_used_at, use_count, quality, archived"


class GraphStore:
    """Nodes, vectors and edges in one SQLite file (see the module docstring for the schema)."""

    def __init__(self, path: str | Path, dimension: int, cache_kb: int | None = None):
        """`cache_kb`: this connection's page cache (``memory.sqlite_cache_kb``); None = SQLite's default."""
        self.path = Path(path)
        self.dimension = int(dimension)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                        timeout=30.0)
        except (OSError, sqlite3.Error) as e:
            raise MemoryStoreError(f"cannot open memory store {self.path}: {e}") from e
        try:
            self._check_dimension()  # before any write: a mismatched store is left untouched
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            if cache_kb is not None:  # negative = KiB (positive would be pages)
                self.conn.execute(f"PRAGMA cache_size=-{int(cache_kb)}")
            with self.transaction():
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('dimension', ?)", (str(self.dimension),))
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                # identifies this store, so an index file left by another store with the same path is never trusted
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
            self.store_uuid = self.conn.execute("SELECT value FROM meta WHERE key='store_uuid'").fetchone()[0]
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise MemoryStoreError(f"{self.path} is not a readable memory store: {e}") from e
        except BaseException:
            self.conn.close()
            raise

    # ---- plumbing --------------------------------------------------------------------
    def _check_dimension(self) -> None:
        has_meta = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            return
        row = self.conn.execute("SELECT value FROM meta WHERE key='dimension'").fetchone()
        if row is not None and int(row[0]) != self.dimension:
            raise DimensionMismatch(
                f"memory store {self.path} was created with dimension {int(row[0])}, but the configured "
                f"dimension is {self.dimension}; use embedding.dimension = {int(row[0])} or another memory.db_path "
                f"(the store was not modified)")

    def transaction(self):
        return _Transaction(self.conn)

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.conn.close()

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
                   if p.exists())

    # ---- nodes -----------------------------------------------------------------------
    def insert_nodes(self, items: Sequence[NewNode], now: float | None = None) -> list[int]:
        """Insert nodes and their outgoing edges in one transaction; returns the new ids.

        An edge whose other end no longer exists (evicted meanwhile) is skipped.
        """
        now = time.time() if now is None else now
        ids = []
        with self.transaction():
            for it in items:
                vec = np.ascontiguousarray(it.vector, np.float32)
                cur = self.conn.execute(
                    "INSERT INTO nodes (text, kind, metadata, created_at, quality, vector) VALUES (?,?,?,?,?,?)",
                    (it.text, it.kind, json.dumps(it.metadata or {}), it.created_at or now, float(it.quality),
                     vec.tobytes()))
                nid = int(cur.lastrowid)
                ids.append(nid)
                for other, type_, weight in it.edges:
                    self._upsert_edge(nid, int(other), type_, weight, now)
        return ids

    def get(self, node_id: int) -> Node:
        row = self.conn.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE id=?", (int(node_id),)).fetchone()
        if row is None:
            raise KeyError(f"memory node {node_id} does not exist (never added, or evicted)")
        return _row_to_node(row)

    def get_many(self, node_ids: Iterable[int]) -> dict[int, Node]:
        ids = [int(i) for i in node_ids]
        out: dict[int, Node] = {}
        for chunk in _chunks(ids, 500):
            q = f"SELECT {_NODE_COLS} FROM nodes WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self.conn.execute(q, chunk):
                out[int(row[0])] = _row_to_node(row)
        return out

    def vectors(self, node_ids: Sequence[int]) -> np.ndarray:
        """(len(node_ids), D) float32 in the given order; KeyError for a missing id."""
        ids = [int(i) for i in node_ids]
        found: dict[int, bytes] = {}
        for chunk in _chunks(ids, 500):
            q = f"SELECT id, vector FROM nodes WHERE id IN ({','.join('?' * len(chunk))})"
            found.update((int(i), v) for i, v in self.conn.execute(q, chunk))
        out = np.zeros((len(ids), self.dimension), np.float32)
        for row, i in enumerate(ids):
            if i not in found:
                raise KeyError(f"memory node {i} does not exist")
            out[row] = np.frombuffer(found[i], np.float32)
        return out

    def active_vectors(self, kinds: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, vectors (n, D) float32) of every non-archived node (of `kinds`): what the index must hold."""
        for kind in kinds or ():
            check_kind(kind)
        where = f" AND kind IN ({','.join('?' * len(kinds))})" if kinds else ""
        rows = self.conn.execute(f"SELECT id, vector FROM nodes WHERE archived=0{where} ORDER BY id",
                                 list(kinds or ())).fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.dimension)
        return ids, vecs.copy()

    def active_ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM nodes WHERE archived=0")), np.int64)

    def nodes(self, kind: str | None = None, include_archived: bool = False) -> list[Node]:
        where, args = self._where(kind, include_archived)
        return [_row_to_node(r) for r in self.conn.execute(f"SELECT {_NODE_COLS} FROM nodes{where} ORDER BY id", args)]

    def count(self, kind: str | None = None, include_archived: bool = False) -> int:
        where, args = self._where(kind, include_archived)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM nodes{where}", args).fetchone()[0])

    @staticmethod
    def _where(kind: str | None, include_archived: bool) -> tuple[str, list]:
        clauses, args = [], []
        if kind is not None:
            check_kind(kind)
            clauses.append("kind=?")
            args.append(kind)
        if not include_archived:
            clauses.append("archived=0")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def mark_used(self, node_ids: Sequence[int], now: float) -> None:
        """Nodes: use_count += 1, last_used_at = now.  Edges among them: use_count += 1, updated_at = now."""
        ids = sorted({int(i) for i in node_ids})
        with self.transaction():
            self.conn.executemany("UPDATE nodes SET use_count=use_count+1, last_used_at=? WHERE id=?",
                                  [(now, i) for i in ids])
            for src, dst, type_ in self.edges_among(ids):
                self.conn.execute("UPDATE edges SET use_count=use_count+1, updated_at=? WHERE src=? AND dst=? AND type=?",
                                  (now, src, dst, type_))

    def set_archived(self, node_ids: Sequence[int], archived: bool = True) -> None:
        with self.transaction():
            self.conn.executemany("UPDATE nodes SET archived=? WHERE id=?", [(int(archived), int(i)) for i in node_ids])

    def delete_nodes(self, node_ids: Sequence[int]) -> None:
        """Delete nodes and (by cascade) every edge touching them."""
        with self.transaction():
            self.conn.executemany("DELETE FROM nodes WHERE id=?", [(int(i),) for i in node_ids])

    def value_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, quality, use_count, last_active_at) of every node, for the eviction score."""
        rows = self.conn.execute("SELECT id, quality, use_count, COALESCE(last_used_at, created_at) FROM nodes").fetchall()
        if not rows:
            z = np.zeros(0)
            return z.astype(np.int64), z, z, z
        arr = np.asarray(rows, np.float64)
        return arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2], arr[:, 3]

    def update_quality(self, updates: Sequence[tuple[int, float]]) -> None:
        with self.transaction():
            self.conn.executemany("UPDATE nodes SET quality=? WHERE id=?", [(float(q), int(i)) for i, q in updates])

    # ---- edges -----------------------------------------------------------------------
    def _upsert_edge(self, src: int, dst: int, type_: str, weight: float, now: float) -> bool:
        """Insert or overwrite the weight of an edge; False when either node is missing."""
        cur = self.conn.execute(
            "INSERT INTO edges (src, dst, type, weight, use_count, created_at, updated_at, decayed_at) "
            "SELECT ?, ?, ?, ?, 0, ?, ?, ? WHERE EXISTS (SELECT 1 FROM nodes WHERE id=?) "
            "AND EXISTS (SELECT 1 FROM nodes WHERE id=?) "
            "ON CONFLICT (src, dst, type) DO UPDATE SET weight=excluded.weight, updated_at=excluded.updated_at",
            (src, dst, type_, weight, now, now, now, src, dst))
        return cur.rowcount > 0

    def add_edge(self, src: int, dst: int, type_: str, weight: float, now: float) -> None:
        weight = check_edge(type_, weight)
        if int(src) == int(dst):
            raise ValueError(f"self-loop edge on node {src}: an edge needs two different nodes")
        with self.transaction():
            if not self._upsert_edge(int(src), int(dst), type_, weight, now):
                missing = [i for i in (src, dst) if not self.conn.execute("SELECT 1 FROM nodes WHERE id=?", (int(i),)).fetchone()]
                raise KeyError(f"cannot add edge {src}->{dst}: node(s) {missing} do not exist")

    def edges_among(self, node_ids: Sequence[int]) -> list[tuple[int, int, str]]:
        """(src, dst, type) of every edge with both ends in `node_ids`."""
        ids = [int(i) for i in node_ids]
        if not ids:
            return []
        idset = set(ids)
        out = []
        for chunk in _chunks(ids, 500):
            q = f"SELECT src, dst, type FROM edges WHERE src IN ({','.join('?' * len(chunk))})"
            out.extend((s, d, t) for s, d, t in self.conn.execute(q, chunk) if d in idset)
        return out

    def edges_full_among(self, node_ids: Sequence[int]) -> list[Edge]:
        ids = [int(i) for i in node_ids]
        idset = set(ids)
        out = []
        for chunk in _chunks(ids, 500):
            q = (f"SELECT src, dst, type, weight, use_count, created_at, updated_at FROM edges "
                 f"WHERE src IN ({','.join('?' * len(chunk))})")
            out.extend(Edge(int(s), int(d), t, float(w), int(u), float(c), float(up))
                       for s, d, t, w, u, c, up in self.conn.execute(q, chunk) if d in idset)
        return out

    def neighbours(self, node_ids: Sequence[int]) -> list[tuple[int, int, float]]:
        """(from_id, neighbour_id, weight) over edges in either direction, excluding archived neighbours."""
        ids = [int(i) for i in node_ids]
        out = []
        for chunk in _chunks(ids, 400):
            ph = ",".join("?" * len(chunk))
            # `+n.archived` keeps SQLite from driving the join off the (archived, kind) index,
            # i.e. from scanning every active node instead of the few edges of `ids`
            q = (f"SELECT e.src, e.dst, e.weight FROM edges e JOIN nodes n ON n.id = e.dst "
                 f"WHERE e.src IN ({ph}) AND +n.archived=0 "
                 f"UNION ALL SELECT e.dst, e.src, e.weight FROM edges e JOIN nodes n ON n.id = e.src "
                 f"WHERE e.dst IN ({ph}) AND +n.archived=0")
            out.extend((int(a), int(b), float(w)) for a, b, w in self.conn.execute(q, chunk + chunk))
        return out

    def edges(self, node_id: int | None = None) -> list[Edge]:
        """Every edge, or those touching `node_id`."""
        q = "SELECT src, dst, type, weight, use_count, created_at, updated_at FROM edges"
        args: tuple = ()
        if node_id is not None:
            q += " WHERE src=? OR dst=?"
            args = (int(node_id), int(node_id))
        return [Edge(int(s), int(d), t, float(w), int(u), float(c), float(up))
                for s, d, t, w, u, c, up in self.conn.execute(q + " ORDER BY src, dst, type", args)]

    def edge_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM edges").fetchone()[0])

    def reinforce_edges(self, node_ids: Sequence[int], reward: float, lr: float, now: float,
                        prune_below: float) -> tuple[int, int]:
        """Apply the reinforcement rule to edges among `node_ids`; returns (updated, pruned).

        w <- w + lr * r * (1 - w)   for r >= 0  (towards 1)
        w <- w + lr * r * w         for r <  0  (towards 0)
        """
        keys = self.edges_among(node_ids)
        pruned = 0
        with self.transaction():
            for src, dst, type_ in keys:
                (w,) = self.conn.execute("SELECT weight FROM edges WHERE src=? AND dst=? AND type=?",
                                         (src, dst, type_)).fetchone()
                w = reinforce_weight(w, reward, lr)
                if w < prune_below:
                    self.conn.execute("DELETE FROM edges WHERE src=? AND dst=? AND type=?", (src, dst, type_))
                    pruned += 1
                else:
                    self.conn.execute("UPDATE edges SET weight=?, use_count=use_count+1, updated_at=? "
                                      "WHERE src=? AND dst=? AND type=?", (w, now, src, dst, type_))
        return len(keys) - pruned, pruned

    def decay_edges(self, per_day: float, prune_below: float, now: float) -> int:
        """w <- w * (1 - per_day) ** days since max(updated_at, decayed_at); prune w < floor; returns pruned."""
        base = 1.0 - per_day

        def factor(since: float) -> float:
            days = max(0.0, now - since) / 86_400.0
            return base ** days if base > 0 else (0.0 if days > 0 else 1.0)

        self.conn.create_function("ruv_decay_factor", 1, factor, deterministic=True)
        with self.transaction():
            self.conn.execute("UPDATE edges SET weight = weight * ruv_decay_factor(MAX(updated_at, decayed_at)), "
                              "decayed_at = ? WHERE MAX(updated_at, decayed_at) < ?", (now, now))
            cur = self.conn.execute("DELETE FROM edges WHERE weight < ?", (prune_below,))
            return int(cur.rowcount)


def reinforce_weight(w: float, reward: float, lr: float) -> float:
    """The edge learning rule; keeps w in [0, 1] for w in [0, 1], reward in [-1, 1], lr in [0, 1]."""
    if reward >= 0:
        w = w + lr * reward * (1.0 - w)
    else:
        w = w + lr * reward * w
    return min(1.0, max(0.0, w))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error; nests by savepoint-free pass-through."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.outer = False

    def __enter__(self):
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if not self.outer:
            return False
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
