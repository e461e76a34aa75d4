"""The living memory: a graph of nodes and learned edges plus a vector index, behind one backend.

``MemoryService`` is the entry point; ``Hit`` is a search result and ``Node`` a stored node.
``MemoryBackend`` is the storage seam (``memory.backend``): ``SqliteBackend`` (SQLite is the
source of truth; the faiss index is rebuilt/reconciled from it on open) or ``PostgresBackend``
(``ruvllm_lab.memory.postgres``; tables + pgvector, shared by several processes).
"""
from __future__ import annotations

from .backend import MemoryBackend, SqliteBackend, dump_memory, open_backend, restore_memory
from .graph_store import Edge, GraphStore, Node, reinforce_weight
from .service import Hit, MemoryService, node_value
from .vectors import VectorIndex, index_path_for
from .writeback import WritebackQueue

__all__ = ["MemoryService", "MemoryBackend", "SqliteBackend", "open_backend", "dump_memory", "restore_memory",
           "Hit", "Node", "Edge", "GraphStore", "VectorIndex", "WritebackQueue", "index_path_for", "node_value",
           "reinforce_weight"]
