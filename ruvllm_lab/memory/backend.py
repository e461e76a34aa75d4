"""The seam between ``MemoryService`` (policy: similar edges, capacity, expansion, validation)
and where memory lives (a graph of nodes and edges plus an ANN index over node vectors).

``MemoryBackend`` is what the service needs from storage; ``open_backend`` picks one by
``memory.backend``:

* ``"sqlite"`` (default) -- ``SqliteBackend``: the SQLite graph store (``graph_store``) is the
  truth; a faiss HNSW index (``vectors``) is held in memory, saved beside the database and
  reconciled with SQLite on open.  One process owns a store.
* ``"postgres"`` -- ``postgres.PostgresBackend``: tables plus a pgvector HNSW index in one
  database that several processes share (each sees the others' committed writes).

Unit of work: ``with backend.transaction(): ...`` makes every write inside it one atomic
commit (nested calls join the outer one).  Outside a transaction each write method commits
by itself.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from ..config import MemoryConfig
from ..errors import MemoryStoreError
from .graph_store import Edge, GraphStore, NewNode, Node, reinforce_weight
from .vectors import VectorIndex, index_path_for

# file names of the SQLite backend inside a backup directory (kept from the first backup format)
SQLITE_DUMP_DB = "memory.db"
SQLITE_DUMP_INDEX = "memory.db.faiss"


@runtime_checkable
class MemoryBackend(Protocol):
    """Graph store + vector index of one memory.  Ids are positive ints, never reused.

    Vectors are (D,) float32 unit norm; a search score is the cosine (inner product).
    Archived nodes stay readable (``get``, ``vectors``) but are excluded from ``ann_search``,
    ``active_vectors`` and ``neighbours``.
    """

    dimension: int
    location: str  # where the store is, for messages (a path, or database/schema)
    open_report: dict[str, Any]  # what opening did (index loaded/rebuilt, ...)

    def transaction(self) -> ContextManager[Any]: ...

    # nodes
    def insert_nodes(self, items: Sequence[NewNode], now: float | None = None) -> list[int]: ...
    def get(self, node_id: int) -> Node: ...
    def get_many(self, node_ids: Sequence[int]) -> dict[int, Node]: ...
    def vectors(self, node_ids: Sequence[int]) -> np.ndarray: ...
    def active_vectors(self, kinds: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]: ...
    def nodes(self, kind: str | None = None, include_archived: bool = False) -> list[Node]: ...
    def count(self, kind: str | None = None, include_archived: bool = False) -> int: ...
    def mark_used(self, node_ids: Sequence[int], now: float) -> None: ...
    def update_quality(self, updates: Sequence[tuple[int, float]]) -> None: ...
    def update_metadata(self, node_id: int, patch: dict[str, Any]) -> dict[str, Any]: ...
    def set_archived(self, node_ids: Sequence[int], archived: bool = True) -> None: ...
    def value_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
    def delete_nodes(self, node_ids: Sequence[int]) -> None: ...

    # vector search over active (non-archived) nodes
    def searchable(self) -> int | None: ...  # None: unknown without a scan
    def ann_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def exact_search(self, query: np.ndarray, k: int, kinds: Sequence[str]) -> list[tuple[int, float]]: ...

    # edges
    def add_edge(self, src: int, dst: int, type_: str, weight: float, now: float) -> None: ...
    def edges(self, node_id: int | None = None) -> list[Edge]: ...
    def edges_full_among(self, node_ids: Sequence[int]) -> list[Edge]: ...
    def neighbours(self, node_ids: Sequence[int]) -> list[tuple[int, int, float]]: ...
    def reinforce(self, node_ids: Sequence[int], reward: float, lr: float, now: float,
                  prune_below: float) -> tuple[int, int]: ...
    def decay_edges(self, per_day: float, prune_below: float, now: float) -> int: ...

    # operations
    def stats(self) -> dict[str, Any]: ...
    def ping(self) -> None: ...
    def save(self) -> None: ...
    def dump(self, directory: Path) -> dict[str, Any]: ...
    def load(self, directory: Path, components: dict[str, str]) -> None: ...
    def close(self) -> None: ...


def open_backend(config: MemoryConfig, dimension: int) -> MemoryBackend:
    """The backend `config.backend` names, opened (created when new)."""
    if config.backend == "sqlite":
        return SqliteBackend(config, dimension)
    if config.backend == "postgres":
        from .postgres import PostgresBackend  # psycopg is only needed by this backend
        return PostgresBackend(config, dimension)
    raise ValueError(f"unknown memory.backend {config.backend!r}; allowed: sqlite, postgres")


def dump_memory(config: MemoryConfig, dimension: int, directory: str | os.PathLike) -> dict[str, Any]:
    """Write a consistent copy of the configured memory into `directory` (for ``ruvllm backup``).

    Returns ``{"components": {name: filename}, "memory": {dimension, nodes, edges, backend}}``;
    both empty when there is no store yet.  The SQLite store is copied from its files without
    opening it (a running server may hold it).
    """
    directory = Path(directory)
    if config.backend == "sqlite":
        return SqliteBackend.dump_files(Path(config.db_path), directory)
    with open_backend(config, dimension) as backend:
        return backend.dump(directory)


def restore_memory(config: MemoryConfig, dimension: int, directory: str | os.PathLike,
                   components: dict[str, str]) -> bool:
    """Replace the configured memory with the dump in `directory`; False when it holds none.

    A dump of the other backend is refused (nothing is touched).  Stop servers first.
    """
    directory = Path(directory)
    kind = dump_backend(components)
    if kind is None:
        return False
    if kind != config.backend:
        raise MemoryStoreError(f"backup {directory} holds a {kind} memory but memory.backend is "
                               f"{config.backend!r}; restore it with memory.backend = {kind!r}")
    if kind == "sqlite":
        SqliteBackend.load_files(Path(config.db_path), directory, components)
        return True
    with open_backend(config, dimension) as backend:
        backend.load(directory, components)
    return True


def dump_backend(components: dict[str, str]) -> str | None:
    """Which backend wrote the memory components of a backup (None: no memory in it)."""
    if "memory_db" in components:
        return "sqlite"
    if "memory_pg_nodes" in components:
        return "postgres"
    return None


class SqliteBackend:
    """SQLite graph store (truth) + in-memory faiss HNSW (search), reconciled on open.

    Index changes wait for the commit of the transaction that made them, so the index never
    holds a node that SQLite rolled back (and a crash before the commit loses neither).
    """

    def __init__(self, config: MemoryConfig, dimension: int):
        self.config = config
        self.dimension = int(dimension)
        self.location = str(config.db_path)
        self.store = GraphStore(config.db_path, self.dimension, config.sqlite_cache_kb)
        self.index_path = index_path_for(config.db_path)
        self.open_report: dict[str, Any] = {}
        self._depth = 0
        self._pending_index: list[tuple[str, Any]] = []  # ("add", (ids, vecs)) | ("remove", ids)
        try:
            self.index = self._open_index()
        except BaseException:
            self.store.close()
            raise

    # ---- the faiss index ---------------------------------------------------------------
    def _sidecar(self) -> Path:
        return Path(f"{self.index_path}.json")

    def _new_index(self) -> VectorIndex:
        c = self.config
        return VectorIndex(self.dimension, c.hnsw_m, c.hnsw_ef_construction, c.hnsw_ef_search, c.index_threads)

    def _open_index(self) -> VectorIndex:
        """The saved index reconciled with SQLite (see ``MemoryService``'s contract), or a rebuilt one."""
        c = self.config
        index = None
        try:
            meta = json.loads(self._sidecar().read_text())
            if meta.get("store_uuid") == self.store.store_uuid:
                index = VectorIndex.load(self.index_path, self.dimension, c.hnsw_m, c.hnsw_ef_construction,
                                         c.hnsw_ef_search, c.index_threads)
        except (OSError, ValueError):
            index = None
        active_ids, active_vecs = self.store.active_vectors()
        if index is None:
            index = self._new_index()
            index.add(active_ids, active_vecs)
            self.open_report = {"index": "rebuilt", "added": int(len(active_ids)), "tombstoned": 0}
            return index
        stored = index.stored_ids()
        stale = np.setdiff1d(stored, active_ids)
        missing_mask = ~np.isin(active_ids, stored)
        index.remove(stale)
        index.add(active_ids[missing_mask], active_vecs[missing_mask])
        self.open_report = {"index": "loaded", "added": int(missing_mask.sum()), "tombstoned": int(len(stale))}
        return index

    def _index_op(self, op: str, arg: Any) -> None:
        if self._depth:
            self._pending_index.append((op, arg))
        else:
            self._apply(op, arg)

    def _apply(self, op: str, arg: Any) -> None:
        if op == "add":
            self.index.add(*arg)
        else:
            self.index.remove(arg)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.store.transaction() as conn:
            self._depth += 1
            try:
                yield conn
            except BaseException:
                self._depth -= 1
                if not self._depth:
                    self._pending_index.clear()
                raise
            self._depth -= 1
        if not self._depth:  # committed: now the index may follow
            pending, self._pending_index = self._pending_index, []
            for op, arg in _coalesce_adds(pending):
                self._apply(op, arg)

    # ---- nodes -------------------------------------------------------------------------
    def insert_nodes(self, items: Sequence[NewNode], now: float | None = None) -> list[int]:
        with self.transaction():
            ids = self.store.insert_nodes(items, now)
            if ids:
                vecs = np.stack([np.asarray(it.vector, np.float32) for it in items])
                self._index_op("add", (np.asarray(ids, np.int64), vecs))
        return ids

    def get(self, node_id: int) -> Node:
        return self.store.get(node_id)

    def get_many(self, node_ids: Sequence[int]) -> dict[int, Node]:
        return self.store.get_many(node_ids)

    def vectors(self, node_ids: Sequence[int]) -> np.ndarray:
        return self.store.vectors(node_ids)

    def active_vectors(self, kinds: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.store.active_vectors(kinds)

    def nodes(self, kind: str | None = None, include_archived: bool = False) -> list[Node]:
        return self.store.nodes(kind, include_archived)

    def count(self, kind: str | None = None, include_archived: bool = False) -> int:
        return self.store.count(kind, include_archived)

    def mark_used(self, node_ids: Sequence[int], now: float) -> None:
        self.store.mark_used(node_ids, now)

    def update_quality(self, updates: Sequence[tuple[int, float]]) -> None:
        self.store.update_quality(updates)

    def update_metadata(self, node_id: int, patch: dict[str, Any]) -> dict[str, Any]:
        with self.transaction() as conn:  # BEGIN IMMEDIATE: no other writer between read and write
            merged = {**self.store.get(node_id).metadata, **patch}
            conn.execute("UPDATE nodes SET metadata=? WHERE id=?", (json.dumps(merged), int(node_id)))
        return merged

    def set_archived(self, node_ids: Sequence[int], archived: bool = True) -> None:
        ids = [int(i) for i in node_ids]
        with self.transaction():
            self.store.set_archived(ids, archived)
            if archived:
                self._index_op("remove", ids)
            else:  # un-archive: back into the index, unless already searchable
                back = sorted(set(ids) - set(self.index.ids().tolist()))
                if back:
                    self._index_op("add", (np.asarray(back, np.int64), self.store.vectors(back)))

    def value_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.store.value_inputs()

    def delete_nodes(self, node_ids: Sequence[int]) -> None:
        ids = [int(i) for i in node_ids]
        with self.transaction():
            self.store.delete_nodes(ids)
            self._index_op("remove", ids)

    # ---- search ------------------------------------------------------------------------
    def searchable(self) -> int:
        return len(self.index)

    def ann_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def exact_search(self, query: np.ndarray, k: int, kinds: Sequence[str]) -> list[tuple[int, float]]:
        ids, vecs = self.store.active_vectors(kinds)
        scores = vecs @ np.asarray(query, np.float32)  # (n,) cosine: stored vectors are normalised
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[j]), float(scores[j])) for j in top]

    # ---- edges -------------------------------------------------------------------------
    def add_edge(self, src: int, dst: int, type_: str, weight: float, now: float) -> None:
        self.store.add_edge(src, dst, type_, weight, now)

    def edges(self, node_id: int | None = None) -> list[Edge]:
        return self.store.edges(node_id)

    def edges_full_among(self, node_ids: Sequence[int]) -> list[Edge]:
        return self.store.edges_full_among(node_ids)

    def neighbours(self, node_ids: Sequence[int]) -> list[tuple[int, int, float]]:
        return self.store.neighbours(node_ids)

    def reinforce(self, node_ids: Sequence[int], reward: float, lr: float, now: float,
                  prune_below: float) -> tuple[int, int]:
        """The edge rule on the edges among `node_ids` and on their nodes' quality, in one transaction."""
        ids = sorted({int(i) for i in node_ids})
        with self.transaction():
            updated, pruned = self.store.reinforce_edges(ids, reward, lr, now, prune_below)
            nodes = self.store.get_many(ids)
            self.store.update_quality([(i, reinforce_weight(n.quality, reward, lr)) for i, n in nodes.items()])
        return updated, pruned

    def decay_edges(self, per_day: float, prune_below: float, now: float) -> int:
        return self.store.decay_edges(per_day, prune_below, now)

    # ---- operations --------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.store.conn
        by_kind = dict(c.execute("SELECT kind, COUNT(*) FROM nodes WHERE archived=0 GROUP BY kind").fetchall())
        edge_types = dict(c.execute("SELECT type, COUNT(*) FROM edges GROUP BY type").fetchall())
        mean_w = c.execute("SELECT AVG(weight) FROM edges").fetchone()[0]
        return {
            "backend": "sqlite",
            "nodes_by_kind": by_kind,
            "edges": self.store.edge_count(),
            "edges_by_type": edge_types,
            "mean_edge_weight": float(mean_w) if mean_w is not None else 0.0,
            "index_vectors": len(self.index),
            "index_tombstones": len(self.index.tombstones),
            "index_bytes": self.index.size_bytes(),
            "index_file_bytes": self.index_path.stat().st_size if self.index_path.exists() else 0,
            "db_bytes": self.store.file_bytes(),
        }

    def ping(self) -> None:
        self.store.conn.execute("SELECT 1").fetchone()
        _ = len(self.index)

    def save(self) -> None:
        """Write the faiss index (atomically) and its sidecar naming this store."""
        self.index.save(self.index_path)
        tmp = self._sidecar().with_name(self._sidecar().name + ".tmp")
        tmp.write_text(json.dumps({"store_uuid": self.store.store_uuid, "dimension": self.dimension,
                                   "ntotal": self.index.ntotal, "saved_at": time.time()}))
        tmp.replace(self._sidecar())

    def dump(self, directory: Path) -> dict[str, Any]:
        self.save()
        return self.dump_files(Path(self.config.db_path), Path(directory))

    def load(self, directory: Path, components: dict[str, str]) -> None:
        """Replace this store with a dump; the backend stays open on the restored store."""
        self.store.close()
        self.load_files(Path(self.config.db_path), Path(directory), components)
        self.store = GraphStore(self.config.db_path, self.dimension, self.config.sqlite_cache_kb)
        self.index = self._open_index()

    def close(self) -> None:
        try:
            self.save()
        finally:
            self.store.close()

    def __enter__(self) -> "SqliteBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- file-level dump/restore (no open store needed) ---------------------------------
    @staticmethod
    def dump_files(db: Path, out: Path) -> dict[str, Any]:
        if not db.exists():
            return {"components": {}, "memory": {}}
        out.mkdir(parents=True, exist_ok=True)
        sqlite_copy(db, out / SQLITE_DUMP_DB)
        components = {"memory_db": SQLITE_DUMP_DB}
        info = sqlite_store_info(out / SQLITE_DUMP_DB)
        index = index_path_for(db)
        sidecar = Path(f"{index}.json")
        if index.exists() and sidecar.exists():
            shutil.copy2(index, out / SQLITE_DUMP_INDEX)
            shutil.copy2(sidecar, out / f"{SQLITE_DUMP_INDEX}.json")
            components["memory_index"] = SQLITE_DUMP_INDEX
            components["memory_index_meta"] = f"{SQLITE_DUMP_INDEX}.json"
        return {"components": components, "memory": info}

    @staticmethod
    def load_files(db: Path, src: Path, components: dict[str, str]) -> None:
        index = index_path_for(db)
        sidecar = Path(f"{index}.json")
        db.parent.mkdir(parents=True, exist_ok=True)
        staged = db.with_name(db.name + ".restoring")
        sqlite_copy(src / components["memory_db"], staged)
        for stale in (Path(f"{db}-wal"), Path(f"{db}-shm"), index, sidecar):
            stale.unlink(missing_ok=True)  # a WAL from the old store must never be replayed onto the new one
        os.replace(staged, db)
        if "memory_index" in components:
            shutil.copy2(src / components["memory_index"], index)
            shutil.copy2(src / components["memory_index_meta"], sidecar)


def _coalesce_adds(ops: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Runs of consecutive index adds as one add (one faiss call for a written batch)."""
    out: list[tuple[str, Any]] = []
    for op, arg in ops:
        if op == "add" and out and out[-1][0] == "add":
            ids, vecs = out[-1][1]
            out[-1] = ("add", (np.concatenate([ids, arg[0]]), np.concatenate([vecs, arg[1]])))
        else:
            out.append((op, arg))
    return out


def sqlite_copy(src: Path, dst: Path) -> None:
    """Consistent copy of a live SQLite database into a fresh file (journal mode DELETE at rest)."""
    if dst.exists():
        dst.unlink()
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(str(dst))
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    finally:
        target.close()
        source.close()


def sqlite_store_info(db: Path) -> dict[str, Any]:
    """Dimension, node and edge counts of a SQLite memory file, read-only (dumps and restores check it)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise MemoryStoreError(f"{db.name} is not a readable memory store: {e}") from e
    try:
        dim = conn.execute("SELECT value FROM meta WHERE key='dimension'").fetchone()
        nodes = conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
        edges = conn.execute("SELECT COUNT(*) FROM edges").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise MemoryStoreError(f"{db.name} is not a readable memory store: {e}") from e
    finally:
        conn.close()
    return {"dimension": int(dim[0]) if dim else None, "nodes": int(nodes), "edges": int(edges)}
