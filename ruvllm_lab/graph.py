"""The retrieved subgraph: what memory hands to graph attention.

Memory (``MemoryService.expand``) builds it; attention (``GraphAttentionEngine``) ranks its
nodes.  Arrays are numpy so the memory layer stays torch-free; ``edge_features`` is the
fixed encoding both sides agree on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NODE_KINDS = ("interaction", "document", "correction", "concept")
EDGE_TYPES = ("similar", "followed_by", "answered_by", "corrects", "member_of")
EDGE_FEATURE_DIM = 1 + len(EDGE_TYPES) + 2  # weight, type one-hot, log-age, log-use-count


@dataclass
class Subgraph:
    node_ids: list[int]  # (N,) store ids
    texts: list[str]  # (N,)
    kinds: list[str]  # (N,) one of NODE_KINDS
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    seed_scores: np.ndarray  # (N,) similarity to the query for search hits, 0 for expanded nodes
    hops: np.ndarray  # (N,) int, 0 for search hits
    use_counts: np.ndarray  # (N,) int
    ages_s: np.ndarray  # (N,) seconds since last use
    quality: np.ndarray  # (N,) float in [0, 1]; float64 from MemoryService.expand, as stored
    edge_index: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), np.int64))  # (2, E) positions
    edge_weight: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (E,) in [0, 1]
    edge_type: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (E,) index into EDGE_TYPES
    edge_age_s: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (E,)
    edge_use_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (E,)
    metadata: list[dict] = field(default_factory=list)  # (N,) node metadata, so the note gate needs no store read

    def __len__(self) -> int:
        return len(self.node_ids)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def edge_features(self) -> np.ndarray:
        """(E, EDGE_FEATURE_DIM) float32: [weight, one-hot(type), log1p(age in days), log1p(use count)]."""
        e = self.num_edges
        feats = np.zeros((e, EDGE_FEATURE_DIM), np.float32)
        if e:
            feats[:, 0] = self.edge_weight
            feats[np.arange(e), 1 + self.edge_type] = 1.0
            feats[:, -2] = np.log1p(np.asarray(self.edge_age_s, np.float32) / 86_400.0)
            feats[:, -1] = np.log1p(np.asarray(self.edge_use_count, np.float32))
        return feats

    @classmethod
    def empty(cls, dim: int) -> "Subgraph":
        z = np.zeros(0, np.float32)
        return cls([], [], [], np.zeros((0, dim), np.float32), z, np.zeros(0, np.int64), np.zeros(0, np.int64), z, z)
