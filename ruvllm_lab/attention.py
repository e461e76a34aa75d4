"""Graph attention over the retrieved subgraph: which memories go into the prompt.

The subgraph (``ruvllm_lab.graph.Subgraph``) gets one extra *query node* linked both ways to
the search hits (hops == 0).  Node features (``node_features``), (N + 1, dim + 9)::

    [ vector (dim) | seed score | hops / 2 | log1p(use count) | quality | kind one-hot (4) | is-query ]

Edge features are ``Subgraph.edge_features()`` (weight, type one-hot, log-age, log-use); graph
edges are used in both directions; query edges carry weight = seed score, type "similar".

Network (``GraphAttentionNet``)::

    e = ReLU(Linear(node features))                               (N+1, hidden)
    g = ELU(GATv2Conv(e, edges, edge_attr; heads, concat))        (N+1, hidden·heads | hidden)
    s_i = MLP([g_i, g_i ⊙ g_q, e_i]) + α · cos(q, v_i)            (N,) relevance logits

The α·cos skip term (α initialised to 1) means a barely trained model still leans on
similarity.  Training is listwise: for each positive p,
``−log(exp s_p / (exp s_p + Σ_{n ∈ negatives} exp s_n))`` with negatives defaulting to every
non-positive node.

Untrained engines rank by cosine similarity (``rank_method == "similarity"``); trained ones
by σ(s_i) (``rank_method == "gatv2"``).  torch_geometric rather than dgl: dgl's wheels stop at
torch 2.2 and need the removed torchdata datapipes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATv2Conv

from .config import AttentionConfig
from .errors import ConfigError, DimensionMismatch
from .graph import EDGE_FEATURE_DIM, EDGE_TYPES, NODE_KINDS, Subgraph

NODE_EXTRA_FEATURES = 4 + len(NODE_KINDS) + 1  # seed score, hops, log use, quality, kind one-hot, is-query


def node_features(query_vec: np.ndarray, sg: Subgraph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subgraph + query -> (x (N+1, dim + NODE_EXTRA_FEATURES), edge_index (2, E'), edge_attr (E', EDGE_FEATURE_DIM)).

    The query node is the last row.  Graph edges appear in both directions; each hop-0 node gets
    a query->node and a node->query edge."""
    n, dim = len(sg), int(query_vec.shape[0])
    x = np.zeros((n + 1, dim + NODE_EXTRA_FEATURES), np.float32)
    if n:
        x[:n, :dim] = sg.vectors
        x[:n, dim + 0] = sg.seed_scores
        x[:n, dim + 1] = np.asarray(sg.hops, np.float32) / 2.0
        x[:n, dim + 2] = np.log1p(np.asarray(sg.use_counts, np.float32))
        x[:n, dim + 3] = sg.quality
        kind_index = [NODE_KINDS.index(k) if k in NODE_KINDS else -1 for k in sg.kinds]
        for i, k in enumerate(kind_index):
            if k >= 0:
                x[i, dim + 4 + k] = 1.0
    x[n, :dim] = query_vec
    x[n, dim + 0] = 1.0  # the query is a perfect match for itself
    x[n, dim + 3] = 1.0
    x[n, -1] = 1.0

    edges = np.asarray(sg.edge_index, np.int64).reshape(2, -1)
    feats = sg.edge_features()
    seeds = np.flatnonzero(np.asarray(sg.hops) == 0) if n else np.zeros(0, np.int64)
    q_feats = np.zeros((len(seeds), EDGE_FEATURE_DIM), np.float32)
    q_feats[:, 0] = np.asarray(sg.seed_scores, np.float32)[seeds] if n else 0.0
    q_feats[:, 1 + EDGE_TYPES.index("similar")] = 1.0
    q_idx = np.full(len(seeds), n, np.int64)
    src = np.concatenate([edges[0], edges[1], q_idx, seeds])
    dst = np.concatenate([edges[1], edges[0], seeds, q_idx])
    attr = np.concatenate([feats, feats, q_feats, q_feats])
    return torch.from_numpy(x), torch.from_numpy(np.stack([src, dst])), torch.from_numpy(attr.astype(np.float32))


def cosine_to_query(query_vec: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    q = query_vec / max(float(np.linalg.norm(query_vec)), 1e-12)
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return (vectors @ q) / norms


class GraphAttentionNet(nn.Module):
    """Relevance logits for every subgraph node; pure (no I/O).  See the module docstring."""

    def __init__(self, dim: int, config: AttentionConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        self.embed = nn.Linear(dim + NODE_EXTRA_FEATURES, hidden)
        self.gat = GATv2Conv(hidden, hidden, heads=config.heads, concat=config.concat_heads,
                             dropout=config.dropout, edge_dim=EDGE_FEATURE_DIM, add_self_loops=True)
        out = hidden * config.heads if config.concat_heads else hidden
        self.score = nn.Sequential(nn.Linear(2 * out + hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.sim_weight = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                sims: torch.Tensor) -> torch.Tensor:
        """x (N+1, F) with the query last, edge_index (2, E), edge_attr (E, EDGE_FEATURE_DIM), sims (N,) -> (N,)."""
        e = F.relu(self.embed(x))  # (N+1, hidden)
        g = F.elu(self.gat(e, edge_index, edge_attr))  # (N+1, out)
        g_nodes, g_query = g[:-1], g[-1:]
        feats = torch.cat([g_nodes, g_nodes * g_query, e[:-1]], dim=-1)  # (N, 2·out + hidden)
        return self.score(feats).squeeze(-1) + self.sim_weight * sims


class GraphAttentionEngine:
    """Ranks a subgraph's nodes for a query and cuts them to a token budget.

    ``rank(q, sg) -> [(node_id, score)]`` best first; ``select_context(q, sg, budget, count_tokens)``
    keeps the ranked nodes whose texts fit the budget (greedy, skipping any that would overflow);
    ``train_step`` / ``fit`` learn from judged outcomes; ``trained`` says which ranking is used.
    """

    def __init__(self, config: AttentionConfig, dim: int, seed: int = 0) -> None:
        if dim < 1:
            raise ConfigError(f"attention needs an embedding dimension >= 1, got {dim}")
        self.config = config
        self.dim = int(dim)
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = GraphAttentionNet(self.dim, config)
        self.net.eval()
        self.trained = False
        self.steps = 0
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def rank_method(self) -> str:
        return "gatv2" if self.trained else "similarity"

    # ---- inference ---------------------------------------------------------------------------------
    def _check(self, query_vec: np.ndarray, sg: Subgraph) -> np.ndarray:
        q = np.asarray(query_vec, np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise DimensionMismatch(f"attention expects a query_vec of dimension {self.dim}, got {q.shape[0]}")
        if len(sg) and sg.vectors.shape[1] != self.dim:
            raise DimensionMismatch(f"subgraph vectors have dimension {sg.vectors.shape[1]}, attention expects {self.dim}")
        return q

    def _logits(self, q: np.ndarray, sg: Subgraph) -> torch.Tensor:
        x, edge_index, edge_attr = node_features(q, sg)
        sims = torch.from_numpy(cosine_to_query(q, np.asarray(sg.vectors, np.float32)).astype(np.float32))
        return self.net(x, edge_index, edge_attr, sims)

    def scores(self, query_vec: np.ndarray, subgraph: Subgraph) -> np.ndarray:
        """(N,) relevance per node in subgraph order: cosine when untrained, σ(logit) when trained."""
        q = self._check(query_vec, subgraph)
        if not len(subgraph):
            return np.zeros(0, np.float32)
        if not self.trained:
            return cosine_to_query(q, np.asarray(subgraph.vectors, np.float32)).astype(np.float32)
        with torch.inference_mode():
            return torch.sigmoid(self._logits(q, subgraph)).numpy()

    def rank(self, query_vec: np.ndarray, subgraph: Subgraph) -> list[tuple[int, float]]:
        s = self.scores(query_vec, subgraph)
        order = np.argsort(-s, kind="stable")
        return [(int(subgraph.node_ids[i]), float(s[i])) for i in order]

    def select_context(self, query_vec: np.ndarray, subgraph: Subgraph, token_budget: int | None,
                       count_tokens: Callable[[str], int], max_items: int | None = None) -> list[tuple[int, float]]:
        """Ranked nodes whose texts fit `token_budget` (default ``config.context_token_budget``), at most `max_items`."""
        budget = self.config.context_token_budget if token_budget is None else int(token_budget)
        text_of = dict(zip(subgraph.node_ids, subgraph.texts))
        chosen, used = [], 0
        for node_id, score in self.rank(query_vec, subgraph):
            if max_items is not None and len(chosen) >= max_items:
                break
            cost = count_tokens(text_of[node_id])
            if used + cost <= budget:
                chosen.append((node_id, score))
                used += cost
        return chosen

    # ---- training ----------------------------------------------------------------------------------
    def loss(self, query_vec: np.ndarray, subgraph: Subgraph, positive_ids: Sequence[int],
             negative_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Listwise loss (module docstring); raises ValueError on ids not in the subgraph."""
        q = self._check(query_vec, subgraph)
        pos_of = {nid: i for i, nid in enumerate(subgraph.node_ids)}
        unknown = [i for i in list(positive_ids) + list(negative_ids or []) if i not in pos_of]
        if unknown:
            raise ValueError(f"node ids {unknown} are not in the subgraph")
        if not positive_ids:
            raise ValueError("train_step needs at least one positive node id")
        pos = torch.tensor([pos_of[i] for i in positive_ids])
        if negative_ids is None:
            neg_mask = torch.ones(len(subgraph), dtype=torch.bool)
            neg_mask[pos] = False
            neg = torch.nonzero(neg_mask).flatten()
        else:
            neg = torch.tensor([pos_of[i] for i in negative_ids], dtype=torch.long)
        logits = self._logits(q, subgraph)  # (N,)
        neg_lse = torch.logsumexp(logits[neg], 0) if len(neg) else torch.tensor(-math.inf)
        pos_logits = logits[pos]  # (P,)
        return (torch.logaddexp(pos_logits, neg_lse.expand_as(pos_logits)) - pos_logits).mean()

    def train_step(self, query_vec: np.ndarray, subgraph: Subgraph, positive_ids: Sequence[int],
                   negative_ids: Sequence[int] | None = None) -> float:
        """One Adam step on one judged outcome; returns the loss before the step."""
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.net.parameters(), lr=self.config.learning_rate)
        self.net.train()
        self._optimizer.zero_grad(set_to_none=True)
        loss = self.loss(query_vec, subgraph, positive_ids, negative_ids)
        loss.backward()
        self._optimizer.step()
        self.net.eval()
        self.trained = True
        self.steps += 1
        return float(loss.detach())

    def fit(self, examples: Iterable[tuple], epochs: int = 10, seed: int | None = None) -> dict:
        """examples: (query_vec, subgraph, positive_ids[, negative_ids]) tuples; shuffled each epoch."""
        examples = list(examples)
        if not examples:
            raise ValueError("fit needs at least one (query_vec, subgraph, positive_ids) example")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        epoch_losses = []
        for _ in range(epochs):
            losses = [self.train_step(*examples[i]) for i in rng.permutation(len(examples))]
            epoch_losses.append(float(np.mean(losses)))
        return {"examples": len(examples), "epochs": epochs, "steps": self.steps,
                "loss_first_epoch": epoch_losses[0], "loss_last_epoch": epoch_losses[-1]}

    def adopt(self, trained_copy: "GraphAttentionEngine") -> None:
        """Serve the network of `trained_copy` (a deep copy of this engine that was trained while
        this one kept serving): one reference swap per attribute, so a query ranking meanwhile
        uses the old or the new network whole, never a network in train mode or mid-update."""
        if trained_copy.dim != self.dim:
            raise DimensionMismatch(f"cannot adopt an attention engine of dimension {trained_copy.dim} into {self.dim}")
        self.net, self._optimizer = trained_copy.net, trained_copy._optimizer
        self.steps = trained_copy.steps
        self.trained = trained_copy.trained

    # ---- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "trained": self.trained, "steps": self.steps, "dim": self.dim}

    def load_state_dict(self, state: dict) -> None:
        if int(state["dim"]) != self.dim:
            raise DimensionMismatch(f"attention state is for dimension {state['dim']}, this engine has {self.dim}")
        self.net.load_state_dict(state["net"])
        self.trained, self.steps = bool(state["trained"]), int(state["steps"])
        self._optimizer = None
        self.net.eval()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    def load(self, path: str | os.PathLike) -> "GraphAttentionEngine":
        self.load_state_dict(torch.load(Path(path), weights_only=True))
        return self
