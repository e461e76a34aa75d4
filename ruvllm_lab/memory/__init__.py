"""The living memory: faiss HNSW vectors + a SQLite graph of nodes and learned edges.

``MemoryService`` is the entry point; ``Hit`` is a search result and ``Node`` a stored node.
SQLite is the source of truth; the vector index is rebuilt/reconciled from it on open.
"""
from __future__ import annotations

from .graph_store import Edge, GraphStore, Node, reinforce_weight
from .service import Hit, MemoryService, node_value
from .vectors import VectorIndex, index_path_for
from .writeback import WritebackQueue

__all__ = ["MemoryService", "Hit", "Node", "Edge", "GraphStore", "VectorIndex", "WritebackQueue",
           "index_path_for", "node_value", "reinforce_weight"]
