"""Compression: cluster memory into summarised ``concept`` nodes, recursively (RAPTOR-style).

Per level (level 1 clusters interaction/document nodes, level L+1 clusters level-L concepts):

1. **Cluster** the items' embeddings: faiss spherical k-means (``method="kmeans"``) or a
   spherical-covariance Gaussian mixture (``method="gmm"``), for every k in
   [k_min, min(k_max, n - 1)], keeping the k with the best

   * ``silhouette``: mean cosine silhouette (higher is better), or
   * ``bic``: the mixture's BIC (variance floor: a tenth of the data's mean per-dimension
     variance, so one- or two-point components cannot collapse); for k-means the X-means BIC of a shared-variance spherical
     Gaussian model (Pelleg & Moore 2000)::

         sigma^2 = SSE / (d (n - k)),   logL = sum_j n_j log(n_j / n) - n d / 2 log(2 pi sigma^2) - d (n - k) / 2
         BIC = -2 logL + k (d + 1) log n                                   (lower is better)

   A level runs only when n >= k_min * min_cluster_size; clusters smaller than
   ``min_cluster_size`` are left alone.
2. **Summarise** each cluster with ``compression.tier`` (default: the pool's smallest tier,
   greedy decoding): the model is asked in one or two words what subject the members are
   about.  Small models name the subject unreliably, so the stored text is *always*
   ``"<model's subject>. Key terms: <top TF-IDF terms of the cluster>"`` -- the appended
   terms keep every concept searchable by its members' vocabulary even when the model
   answers badly.  ``faithfulness`` is measured on the model-written part only: the share
   of the cluster's top-10 TF-IDF keywords that it mentions (after light suffix stemming).
3. **Store** a ``concept`` node whose vector is the normalised mean of the summary's
   embedding and the members' centroid (the centroid alone when no embedder is given),
   with ``member_of`` edges member -> concept weighted by the member's cosine to the
   centroid (clipped to [0, 1]); optionally archive the members (kept in SQLite, removed
   from the HNSW index).  Retrieval then searches concepts and members together (the
   collapsed tree); an archived member is reached through its concept.

Nodes that already belong to a concept (an outgoing ``member_of`` edge) are not clustered
again, so running compression twice does not duplicate concepts.

``CompressionReport`` gives nodes and index bytes before/after, recall@k of answer-bearing
nodes before/after (directly, and through a concept whose members contain one), and
summary faithfulness.  With ``pool=None`` no model is asked: a concept's text is its key
terms alone (an extractive summary), which separates retrieval from the LLM.

Retrieval over the tree (``TreeRetriever``), always into one fixed token budget ``B``
(tokens of the embedder's tokenizer; RAPTOR counts tiktoken tokens).  Nodes are taken in
rank order while they fit; the first that does not fit ends the context (RAPTOR's rule):

* ``descent`` -- RAPTOR's tree traversal, adapted to archived members and a budget: an HNSW
  search over the *indexed* nodes (top-level concepts and unclustered leaves) returns the start
  layer; the ``beam`` best concepts of a layer are expanded (every child scored exactly against
  the query) and the ``beam`` best child concepts form the next layer, down to the leaves.  All
  leaves reached (and leaves hit directly) are ranked by cosine and fill the budget; concept
  summaries route but are not put in the context (RAPTOR's traversal also adds them; here they
  would spend the budget on key-term lists).  On an uncompressed memory this is plain top-k.
* ``collapsed`` -- RAPTOR's collapsed tree: leaves (archived ones too) and concept summaries of
  every level are ranked together by cosine and fill the budget, summaries included.  RAPTOR
  scores every node exactly; here the flattened set is searched with an HNSW index built with
  the memory's settings, so its cost is comparable with ``descent`` (an exact scan would cost
  one score per node).

``vectors_scored`` is the retrieval cost: HNSW distance evaluations (faiss' ``hnsw_stats.ndis``)
plus every child scored during descent.  ``storage_bytes`` is what the store occupies: the
SQLite file after ``VACUUM`` (archived rows, concepts and edges included) plus the serialised
faiss index (tombstoned vectors included, as HNSW keeps them until a rebuild).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Sequence

import numpy as np

from .config import CompressionConfig, Config

log = logging.getLogger(__name__)

SUMMARY_PROMPT = ("Sentences:\n{notes}\n\n"
                  "In one or two words, what subject are all these sentences about?")
MAX_MEMBERS_IN_PROMPT = 12  # keeps the prompt inside a small model's context
MAX_MEMBER_CHARS = 200
TFIDF_TERMS = 6  # appended to the summary
FAITHFULNESS_TERMS = 10  # member keywords the summary is checked against


# ---- clustering (pure) ----------------------------------------------------------------------------
def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def kmeans_labels(x: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """faiss spherical k-means: (labels (n,), centroids (k, d))."""
    import faiss

    x = np.ascontiguousarray(_normalise(x))
    km = faiss.Kmeans(x.shape[1], k, niter=25, nredo=5, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), km.centroids


def kmeans_bic(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """X-means BIC of a k-means partition (module docstring); lower is better."""
    n, d = x.shape
    if n <= k:
        return float("inf")
    centroids = np.stack([x[labels == j].mean(0) for j in range(k)])
    sse = float(((x - centroids[labels]) ** 2).sum())
    var = max(sse / (d * (n - k)), 1e-12)
    counts = np.bincount(labels, minlength=k)
    counts = counts[counts > 0]
    loglik = float((counts * np.log(counts / n)).sum()) - n * d / 2 * math.log(2 * math.pi * var) - d * (n - k) / 2
    return -2 * loglik + k * (d + 1) * math.log(n)


def cluster(x: np.ndarray, config: CompressionConfig, seed: int = 0) -> tuple[np.ndarray, int, dict[int, float]]:
    """Choose k and cluster; returns (labels (n,), k, {k: selection score})."""
    from sklearn.metrics import silhouette_score

    x = _normalise(x)
    n = x.shape[0]
    ks = list(range(max(2, config.k_min), min(config.k_max, n - 1) + 1))
    if not ks:
        return np.zeros(n, np.int64), 1, {}
    scores: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    # A component holding one or two points collapses to ~zero variance and an unbounded
    # likelihood, which would make BIC favour k_max; a variance floor of a tenth of the
    # data's mean per-dimension variance prevents it.
    reg_covar = max(1e-6, 0.1 * float(x.var(0).mean()))
    for k in ks:
        if config.method == "gmm":
            from sklearn.mixture import GaussianMixture

            gm = GaussianMixture(k, covariance_type="spherical", random_state=seed, n_init=2,
                                 reg_covar=reg_covar).fit(x)
            labels = gm.predict(x).astype(np.int64)
            bic = float(gm.bic(x))
        else:
            labels, _ = kmeans_labels(x, k, seed)
            bic = kmeans_bic(x, labels, k) if config.k_selection == "bic" else float("nan")
        used = len(np.unique(labels))
        if used < 2:
            continue
        if config.k_selection == "silhouette":
            score = float(silhouette_score(x, labels, metric="cosine"))  # higher is better
            key = -score
        else:
            score = bic
            key = bic
        scores[k] = score
        if best is None or key < best[0]:
            best = (key, k, labels)
    if best is None:
        return np.zeros(n, np.int64), 1, scores
    return best[2], best[1], scores


# ---- keywords and summaries (pure) ------------------------------------------------------------------
def cluster_keywords(texts: Sequence[str], labels: np.ndarray, top: int) -> dict[int, list[str]]:
    """Top TF-IDF terms per cluster: each cluster's members are one document against the others."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    ids = sorted(set(int(l) for l in labels))
    docs = [" ".join(t for t, l in zip(texts, labels) if l == c) for c in ids]
    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", sublinear_tf=True)
    try:
        m = vec.fit_transform(docs)
    except ValueError:  # only stop words
        return {c: [] for c in ids}
    vocab = np.array(vec.get_feature_names_out())
    out = {}
    for row, c in enumerate(ids):
        weights = m[row].toarray()[0]
        order = np.argsort(-weights, kind="stable")
        out[c] = [str(vocab[i]) for i in order[:top] if weights[i] > 0]
    return out


_QUOTED = re.compile(r"[\"“”]([^\"“”]{2,80})[\"“”]")
_PREAMBLE = re.compile(r"^(the\s+)?(common\s+|main\s+)?(subject|topic|theme)s?\s+(of\s+[\w\s]*?)?(is|are)\s*:?\s*",
                       re.IGNORECASE)


def parse_subject(reply: str, max_words: int = 8) -> str:
    """The subject a model named: its quoted phrases if any, else the first sentence without
    a "The subject of these sentences is" preamble; at most `max_words` words."""
    reply = (reply or "").strip()
    quoted = list(dict.fromkeys(q.strip().rstrip(".") for q in _QUOTED.findall(reply)))
    if quoted:
        text = ", ".join(quoted[:3])
    else:
        text = _PREAMBLE.sub("", re.split(r"[\n.!?]", reply, maxsplit=1)[0]).strip(" :,-*#\"")
    return " ".join(text.split()[:max_words])


_SUFFIXES = ("ing", "ies", "ed", "es", "er", "s", "e", "y")


def _stem(word: str) -> str:
    """A deliberately light stemmer: strip one common suffix, keeping >= 3 letters."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


def _mentions(text: str, keyword: str) -> bool:
    """Whole-word match after light stemming (bake / baking, planet / planets, recipe / recipes)."""
    target = _stem(keyword.lower())
    return any(_stem(w) == target for w in re.findall(r"[a-z]+", text.lower()))


def faithfulness(summary: str, keywords: Sequence[str]) -> float:
    """Share of `keywords` the summary mentions (nan when there are no keywords)."""
    if not keywords:
        return float("nan")
    return sum(_mentions(summary, k) for k in keywords) / len(keywords)


def summary_text(subject: str, terms: Sequence[str]) -> str:
    subject = subject.strip() or "Untitled"
    return f"{subject}. Key terms: {', '.join(terms)}" if terms else subject


# ---- the job ----------------------------------------------------------------------------------------------
@dataclass
class ConceptSummary:
    node_id: int
    level: int
    member_ids: list[int]
    subject: str  # what the model said the cluster is about (parsed)
    reply: str  # the model's raw reply
    keywords: list[str]  # top TF-IDF terms appended to the stored text
    text: str  # the stored concept text
    faithfulness: float


@dataclass
class CompressionReport:
    tier: str
    nodes_before: int
    nodes_after: int
    index_bytes_before: int
    index_bytes_after: int
    concepts: list[ConceptSummary] = field(default_factory=list)
    levels: list[dict[str, Any]] = field(default_factory=list)  # per level: items, k, selection scores
    archived: int = 0
    recall_k: int = 5
    recall_before: float | None = None  # an answer-bearing node in the top k
    recall_after: float | None = None  # same, after compression (archived members cannot be hit)
    recall_after_collapsed: float | None = None  # ... or a concept with one among its members
    mean_faithfulness: float | None = None
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _search_ids(memory: Any, query: Any, k: int, embedder: Any) -> list[int]:
    if isinstance(query, str) and embedder is not None and getattr(memory, "embedder", None) is None:
        query = embedder.embed_one(query)
    return [h.node_id for h in memory.search(query, k)]


def _recall(memory, queries, k, embedder, members_of: dict[int, set[int]] | None = None) -> float | None:
    if not queries:
        return None
    hits = 0
    for query, answer_ids in queries:
        answer_ids = set(int(i) for i in answer_ids)
        found = set(_search_ids(memory, query, k, embedder))
        reach = set(found)
        if members_of is not None:
            for nid in found:
                reach |= members_of.get(nid, set())
        hits += bool(reach & answer_ids)
    return hits / len(queries)


def compress_memory(memory: Any, pool: Any, config: CompressionConfig, *, tier: str | None = None,
                    embedder: Any = None, kinds: Sequence[str] = ("interaction", "document"),
                    eval_queries: Sequence[tuple[Any, Collection[int]]] | None = None, recall_k: int = 5,
                    seed: int = 0) -> CompressionReport:
    """Build the concept hierarchy in `memory` (see the module docstring); returns the report.

    ``pool=None``: extractive summaries (key terms only, no model).
    ``eval_queries``: (query text or vector, ids of the nodes that hold its answer) pairs for
    the recall@k measurement.  ``embedder`` embeds summaries (and text queries when the
    memory has no embedder of its own); default: ``memory.embedder``.
    """
    t0 = time.perf_counter()
    embedder = embedder if embedder is not None else getattr(memory, "embedder", None)
    tier = tier or config.tier or (pool.tiers[0] if pool is not None else "extractive")
    stats0 = memory.stats()
    recall_before = _recall(memory, eval_queries, recall_k, embedder)

    already = {e.src for e in memory.edges() if e.type == "member_of"}
    items = [n for kind in kinds for n in memory.nodes(kind) if n.id not in already and not n.archived]
    report = CompressionReport(tier=tier, nodes_before=int(stats0["nodes"]), nodes_after=int(stats0["nodes"]),
                               index_bytes_before=int(stats0["index_bytes"]),
                               index_bytes_after=int(stats0["index_bytes"]), recall_k=recall_k,
                               recall_before=recall_before)
    members_of: dict[int, set[int]] = {}  # concept id -> all (transitive) member ids
    for level in range(1, config.max_depth + 1):
        n = len(items)
        if n < max(2, config.k_min * config.min_cluster_size):
            report.levels.append({"level": level, "items": n, "skipped": "too few items"})
            break
        ids = [it.id for it in items]
        texts = [it.text for it in items]
        vectors = _normalise(np.stack([memory.vector(i) for i in ids]))
        labels, k, scores = cluster(vectors, config, seed=seed + level)
        keywords = cluster_keywords(texts, labels, max(TFIDF_TERMS, FAITHFULNESS_TERMS))
        level_info: dict[str, Any] = {"level": level, "items": n, "k": k,
                                      "selection": config.k_selection, "scores": scores, "concepts": 0}
        new_items = []
        for c in range(k):
            idx = np.flatnonzero(labels == c)
            if len(idx) < config.min_cluster_size:
                continue
            member_ids = [ids[i] for i in idx]
            centroid = _normalise(vectors[idx].mean(0))
            # the members nearest the centroid go into the prompt first
            order = idx[np.argsort(-(vectors[idx] @ centroid))][:MAX_MEMBERS_IN_PROMPT]
            notes = "\n".join(f"- {texts[i][:MAX_MEMBER_CHARS].strip()}" for i in order)
            terms = keywords.get(c, [])
            if pool is None:  # extractive: the key terms are the whole summary
                reply, subject = "", ""
                text = f"Key terms: {', '.join(terms[:TFIDF_TERMS])}"
            else:
                reply = pool.generate(tier, [{"role": "user", "content": SUMMARY_PROMPT.format(notes=notes)}],
                                      max_tokens=config.summary_max_tokens, temperature=0.0).text
                subject = parse_subject(reply)
                text = summary_text(subject, terms[:TFIDF_TERMS])
            vec = centroid
            if embedder is not None:
                vec = _normalise(_normalise(embedder.embed_one(text)) + centroid)
            quality = float(np.mean([it.quality for it in (items[i] for i in idx)]))
            concept_id = memory.add(text, kind="concept", vector=vec, quality=quality,
                                    metadata={"level": level, "members": len(member_ids), "subject": subject,
                                              "keywords": terms[:TFIDF_TERMS], "tier": tier})
            for i, mid in zip(idx, member_ids):
                memory.add_edge(mid, concept_id, "member_of", float(np.clip(vectors[i] @ centroid, 0.0, 1.0)))
            reach = set(member_ids)
            for mid in member_ids:
                reach |= members_of.get(mid, set())
            members_of[concept_id] = reach
            faith = faithfulness(reply, terms[:FAITHFULNESS_TERMS]) if pool is not None else float("nan")
            report.concepts.append(ConceptSummary(concept_id, level, member_ids, subject, reply,
                                                  terms[:TFIDF_TERMS], text, faith))
            if config.archive_members:
                memory.archive(member_ids)
                report.archived += len(member_ids)
            new_items.append(memory.get(concept_id))
            level_info["concepts"] += 1
        report.levels.append(level_info)
        log.info("compression level %d: %d items -> k=%d, %d concepts", level, n, k, level_info["concepts"])
        if not new_items:
            break
        items = new_items

    stats1 = memory.stats()
    report.nodes_after = int(stats1["nodes"])
    report.index_bytes_after = int(stats1["index_bytes"])
    report.recall_after = _recall(memory, eval_queries, recall_k, embedder)
    report.recall_after_collapsed = _recall(memory, eval_queries, recall_k, embedder, members_of)
    faiths = [c.faithfulness for c in report.concepts if not math.isnan(c.faithfulness)]
    report.mean_faithfulness = float(np.mean(faiths)) if faiths else None
    report.duration_s = time.perf_counter() - t0
    return report


# ---- retrieval over the concept tree (module docstring) ----------------------------------------------------
RETRIEVAL_MODES = ("descent", "collapsed")


@dataclass
class Retrieval:
    node_ids: list[int]  # nodes whose text is in the context, in context order
    texts: list[str]
    tokens: int  # context tokens, <= the budget
    vectors_scored: int  # HNSW distance evaluations + exact scores during descent


def concept_children(memory: Any) -> dict[int, list[int]]:
    """Concept id -> its direct members (``member_of`` edges, member -> concept)."""
    children: dict[int, list[int]] = {}
    for e in memory.edges():
        if e.type == "member_of":
            children.setdefault(int(e.dst), []).append(int(e.src))
    return {c: sorted(m) for c, m in children.items()}


def _hnsw_search(index: Any, qvec: np.ndarray, k: int) -> tuple[list[tuple[float, int]], int]:
    """(score, id) pairs of a VectorIndex search and the distance evaluations it made."""
    import faiss

    stats = faiss.cvar.hnsw_stats
    stats.reset()
    scores, ids = index.search(qvec[None, :], min(k, len(index)))
    return [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0], int(stats.ndis)


def fill_budget(ranked: Sequence[tuple[int, str]], budget: int, count_tokens: Any) -> tuple[list[int], list[str], int]:
    """RAPTOR's rule: take (id, text) in rank order while the running token total stays within
    ``budget``; the first node that does not fit ends the context."""
    ids, texts, total = [], [], 0
    for nid, text in ranked:
        n = count_tokens(text)
        if total + n > budget:
            break
        ids.append(nid)
        texts.append(text)
        total += n
    return ids, texts, total


class TreeRetriever:
    """Budgeted retrieval from a memory with (or without) a concept tree; see the module docstring.

    ``count_tokens(text) -> int`` defines the budget's unit (``EmbeddingService.count_tokens``).
    The first search asks for ``floor(budget / shortest node) + 1`` hits: no more nodes can fit.
    """

    def __init__(self, memory: Any, count_tokens: Any, budget: int, beam: int = 2):
        if budget < 1 or beam < 1:
            raise ValueError(f"budget ({budget}) and beam ({beam}) must be >= 1")
        self.memory, self.budget, self.beam = memory, int(budget), int(beam)
        self.children = concept_children(memory)
        nodes = memory.nodes(include_archived=True)
        self.text = {n.id: n.text for n in nodes}
        self._tokens: dict[str, int] = {}
        self._count = count_tokens
        shortest = min((self.count_tokens(t) for t in self.text.values()), default=1)
        self.k_fetch = self.budget // max(1, shortest) + 1
        self._collapsed: Any = None

    def count_tokens(self, text: str) -> int:
        if text not in self._tokens:
            self._tokens[text] = int(self._count(text))
        return self._tokens[text]

    def __call__(self, qvec: np.ndarray, mode: str = "descent") -> Retrieval:
        if mode == "descent":
            return self.descent(qvec)
        if mode == "collapsed":
            return self.collapsed(qvec)
        raise ValueError(f"retrieval mode {mode!r}: allowed values are {', '.join(RETRIEVAL_MODES)}")

    def descent(self, qvec: np.ndarray) -> Retrieval:
        qvec = _normalise(qvec)
        with self.memory._lock:  # the search reads the live index; hnsw_stats is process-global
            hits, scored = _hnsw_search(self.memory.index, qvec, self.k_fetch)
        leaves: dict[int, float] = {}
        layer: list[tuple[float, int]] = []
        for score, nid in hits:
            if nid in self.children:
                layer.append((score, nid))
            else:
                leaves[nid] = score
        while layer:
            layer.sort(key=lambda p: (-p[0], p[1]))
            nxt = []
            for _, cid in layer[:self.beam]:
                kids = self.children[cid]
                sims = self.memory.store.vectors(kids) @ qvec
                scored += len(kids)
                for kid, sim in zip(kids, sims):
                    if kid in self.children:
                        nxt.append((float(sim), kid))
                    else:
                        leaves[kid] = max(leaves.get(kid, -np.inf), float(sim))
            layer = nxt
        ranked = sorted(leaves, key=lambda i: (-leaves[i], i))
        ids, texts, total = fill_budget([(i, self.text[i]) for i in ranked], self.budget, self.count_tokens)
        return Retrieval(ids, texts, total, scored)

    def collapsed_index(self) -> Any:
        """HNSW index over every node of the tree (leaves, archived ones too, and concepts)."""
        if self._collapsed is None:
            from .memory.vectors import VectorIndex

            c = self.memory.config
            ids = np.asarray(sorted(self.text), np.int64)
            index = VectorIndex(self.memory.dimension, c.hnsw_m, c.hnsw_ef_construction, c.hnsw_ef_search,
                                c.index_threads)
            index.add(ids, self.memory.store.vectors(ids.tolist()))
            self._collapsed = index
        return self._collapsed

    def collapsed(self, qvec: np.ndarray) -> Retrieval:
        hits, scored = _hnsw_search(self.collapsed_index(), _normalise(qvec), self.k_fetch)
        ids, texts, total = fill_budget([(i, self.text[i]) for _, i in hits], self.budget, self.count_tokens)
        return Retrieval(ids, texts, total, scored)


def index_bytes(index: Any) -> int:
    """Serialised size of a VectorIndex (vectors, ids and HNSW links; tombstones included)."""
    import faiss

    return int(faiss.serialize_index(index.index).size)


def storage_bytes(memory: Any) -> dict[str, int]:
    """What the store occupies: SQLite file bytes after a WAL checkpoint and ``VACUUM`` (every row,
    archived ones included, and the edges) and the serialised faiss index."""
    with memory._lock:
        conn = memory.store.conn
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db = memory.store.path.stat().st_size
        wal = memory.store.path.with_name(memory.store.path.name + "-wal")
        db += wal.stat().st_size if wal.exists() else 0
        idx = index_bytes(memory.index)
    return {"db_bytes": int(db), "index_bytes": idx, "storage_bytes": int(db) + idx}


def compress_store(config: Config) -> dict[str, Any]:
    """What ``ruvllm compress`` runs: open the configured store, pool and embedder; compress; close."""
    from .embedding import EmbeddingService
    from .inference import InferencePool
    from .memory import MemoryService

    if not config.compression.enabled:
        return {"skipped": "compression.enabled is false"}
    embedder = EmbeddingService(config.embedding)
    pool = InferencePool(config.inference, config.system)
    try:
        with MemoryService(config.memory, dimension=config.embedding.dimension, embedder=embedder) as memory:
            report = compress_memory(memory, pool, config.compression, embedder=embedder, seed=config.system.seed)
    finally:
        pool.close()
    return report.to_dict()
