"""MemoryService unit tests on real faiss and real SQLite (small random vectors unless stated)."""
from __future__ import annotations

import hashlib
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ruvllm_lab.config import EmbeddingConfig, MemoryConfig
from ruvllm_lab.errors import DimensionMismatch, MemoryStoreError
from ruvllm_lab.graph import EDGE_FEATURE_DIM, EDGE_TYPES, Subgraph
from ruvllm_lab.memory import MemoryService, WritebackQueue, node_value, reinforce_weight

DIM = 16


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def basis(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    return v


@pytest.fixture
def cfg(tmp_path) -> MemoryConfig:
    return MemoryConfig(db_path=str(tmp_path / "memory.db"), similar_edges_k=0, writeback_interval_ms=20)


@pytest.fixture
def mem(cfg):
    m = MemoryService(cfg, DIM)
    yield m
    m.close()


def index_matches_sqlite(m: MemoryService) -> bool:
    return set(m.index.ids().tolist()) == set(m.store.active_ids().tolist())


# ---- add / get / search ---------------------------------------------------------------
def test_add_get_roundtrip(mem):
    nid = mem.add("remember the milk", kind="document", metadata={"source": "note"}, vector=unit(1) * 3,
                  quality=0.8)
    node = mem.get(nid)
    assert (node.text, node.kind, node.metadata, node.quality) == ("remember the milk", "document", {"source": "note"}, 0.8)
    assert node.use_count == 0 and node.last_used_at is None and not node.archived
    np.testing.assert_allclose(mem.vector(nid), unit(1), atol=1e-6)  # stored normalised
    with pytest.raises(KeyError):
        mem.get(nid + 100)


def test_count_and_nodes_by_kind(mem):
    for i, kind in enumerate(["interaction", "document", "document", "concept"]):
        mem.add(f"n{i}", kind=kind, vector=unit(i))
    assert mem.count() == 4 and mem.count("document") == 2 and mem.count("correction") == 0
    assert [n.text for n in mem.nodes("document")] == ["n1", "n2"]
    with pytest.raises(ValueError, match="unknown node kind"):
        mem.count("gossip")


def test_search_ranks_by_cosine(mem):
    ids = [mem.add(f"n{i}", vector=unit(i)) for i in range(30)]
    q = unit(7) + 0.1 * unit(100)
    hits = mem.search(q, k=5)
    assert hits[0].node_id == ids[7] and hits[0].text == "n7"
    assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)
    expected = sorted(range(30), key=lambda i: -float(unit(i) @ (q / np.linalg.norm(q))))[:5]
    assert [h.node_id for h in hits] == [ids[i] for i in expected]


def test_search_kinds_filter_and_small_store(mem):
    assert mem.search(unit(0), k=3) == []
    for i in range(20):
        mem.add(f"n{i}", kind="correction" if i % 10 == 0 else "interaction", vector=unit(i))
    hits = mem.search(unit(5), k=5, kinds=("correction",))
    assert {h.text for h in hits} == {"n0", "n10"} and all(h.kind == "correction" for h in hits)
    assert len(mem.search(unit(5), k=100)) == 20


def test_rare_kind_search_is_exact_and_agrees_with_the_widening_ann_search(mem, monkeypatch):
    import ruvllm_lab.memory.service as service
    ids = [mem.add(f"n{i}", kind="correction" if i % 50 == 0 else "interaction", vector=unit(i)) for i in range(400)]
    q = unit(3)
    exact = mem.search(q, k=3, kinds=("correction",))  # 8 corrections: the brute-force path
    want = sorted((i for i in range(400) if i % 50 == 0), key=lambda i: -float(unit(i) @ q))[:3]
    assert [h.node_id for h in exact] == [ids[i] for i in want]
    assert [h.score for h in exact] == pytest.approx([float(unit(i) @ q) for i in want], abs=1e-5)
    monkeypatch.setattr(service, "EXACT_KIND_SEARCH_MAX", 0)  # force the widening ANN path
    assert [h.node_id for h in mem.search(q, k=3, kinds=("correction",))] == [h.node_id for h in exact]


def test_empty_text_is_rejected(mem):
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            mem.add(bad, vector=unit(0))
        with pytest.raises(ValueError, match="empty"):
            mem.enqueue(bad, vector=unit(0))
    assert mem.count() == 0


def test_bad_kind_edge_type_weight_quality(mem):
    a = mem.add("a", vector=unit(0))
    b = mem.add("b", vector=unit(1))
    with pytest.raises(ValueError, match="kind"):
        mem.add("x", kind="rumour", vector=unit(2))
    with pytest.raises(ValueError, match="edge type"):
        mem.add_edge(a, b, "likes")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mem.add_edge(a, b, "similar", 1.5)
    with pytest.raises(ValueError, match="quality"):
        mem.add("x", vector=unit(2), quality=2.0)
    with pytest.raises(ValueError, match="JSON"):
        mem.add("x", vector=unit(2), metadata={"f": object()})
    with pytest.raises(KeyError, match="do not exist"):
        mem.add_edge(a, 999, "similar")
    with pytest.raises(ValueError, match="self-loop"):
        mem.add_edge(a, a, "similar")


def test_wrong_vector_dimension_names_both(mem):
    with pytest.raises(DimensionMismatch, match=r"dimension 8.*dimension is 16"):
        mem.add("x", vector=np.ones(8))
    with pytest.raises(DimensionMismatch, match="8.*16"):
        mem.search(np.ones(8), k=1)
    with pytest.raises(ValueError, match="zero"):
        mem.add("x", vector=np.zeros(DIM))
    assert mem.count() == 0


def test_opening_a_store_of_another_dimension_changes_nothing(cfg):
    with MemoryService(cfg, DIM) as m:
        m.add("kept", vector=unit(0))
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(cfg.db_path).parent.iterdir()}
    with pytest.raises(DimensionMismatch, match=r"dimension 16.*configured dimension is 32"):
        MemoryService(cfg, 32)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(cfg.db_path).parent.iterdir()} == files
    with MemoryService(cfg, DIM) as m:
        assert [n.text for n in m.nodes()] == ["kept"]


def test_embedder_dimension_must_match(cfg):
    class Embedder:  # anything with .dimension; the check happens before any embedding
        dimension = 384
    with pytest.raises(DimensionMismatch, match="384.*16"):
        MemoryService(cfg, DIM, embedder=Embedder())


def test_text_without_vector_needs_an_embedder(mem):
    with pytest.raises(ValueError, match="embedder"):
        mem.add("no vector here")
    with pytest.raises(ValueError, match="embedder"):
        mem.search("a text query", k=1)


def test_not_a_store_is_a_clear_error(tmp_path):
    bogus = tmp_path / "memory.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MemoryStoreError, match="not a readable memory store"):
        MemoryService(MemoryConfig(db_path=str(bogus)), DIM)


# ---- similar edges --------------------------------------------------------------------
def test_similar_edges_link_nearest_neighbours(tmp_path):
    cfg = MemoryConfig(db_path=str(tmp_path / "m.db"), similar_edges_k=2, similar_edge_min_score=0.5)
    with MemoryService(cfg, DIM) as m:
        a = m.add("a", vector=basis(0))
        b = m.add("b", vector=basis(0) + 0.2 * basis(1))
        c = m.add("c", vector=basis(0) + 0.5 * basis(1))
        far = m.add("far", vector=basis(5))  # orthogonal to all: no edge
        edges = {(e.src, e.dst): e for e in m.edges()}
        assert set(edges) == {(b, a), (c, b), (c, a)}
        assert all(e.type == "similar" for e in edges.values())
        cos_ca = float(m.vector(c) @ m.vector(a))
        assert edges[(c, a)].weight == pytest.approx(cos_ca, abs=1e-5)
        assert m.edges(far) == []


def test_add_edge_upserts(mem):
    a, b = mem.add("a", vector=unit(0)), mem.add("b", vector=unit(1))
    mem.add_edge(a, b, "followed_by", 0.3)
    mem.add_edge(a, b, "followed_by", 0.7)
    mem.add_edge(a, b, "answered_by", 0.1)
    edges = {(e.type): e.weight for e in mem.edges(a)}
    assert edges == {"followed_by": pytest.approx(0.7), "answered_by": pytest.approx(0.1)}


# ---- edge learning --------------------------------------------------------------------
def test_reinforce_weight_rule():
    assert reinforce_weight(0.5, 1.0, 0.2) == pytest.approx(0.5 + 0.2 * 1.0 * 0.5)
    assert reinforce_weight(0.5, -1.0, 0.2) == pytest.approx(0.5 - 0.2 * 0.5)
    assert reinforce_weight(0.4, 0.5, 0.1) == pytest.approx(0.4 + 0.1 * 0.5 * 0.6)
    assert reinforce_weight(0.4, 0.0, 0.1) == pytest.approx(0.4)
    rng = np.random.default_rng(0)
    w = 0.5
    for _ in range(2000):
        w = reinforce_weight(w, float(rng.uniform(-1, 1)), float(rng.uniform(0, 1)))
        assert 0.0 <= w <= 1.0
    for _ in range(200):
        w = reinforce_weight(w, 1.0, 1.0)
    assert w == 1.0


def test_reinforce_updates_edges_among_used_nodes_and_quality(mem, cfg):
    a, b, c = (mem.add(t, vector=unit(i), quality=0.5) for i, t in enumerate("abc"))
    mem.add_edge(a, b, "followed_by", 0.5)
    mem.add_edge(b, c, "followed_by", 0.5)
    lr = cfg.edge_learning_rate
    assert mem.reinforce([a, b], 1.0) == 1
    w = {(e.src, e.dst): e for e in mem.edges()}
    assert w[(a, b)].weight == pytest.approx(0.5 + lr * 0.5)
    assert w[(a, b)].use_count == 1
    assert w[(b, c)].weight == pytest.approx(0.5)  # c was not used
    assert mem.get(a).quality == pytest.approx(0.5 + lr * 0.5) and mem.get(c).quality == pytest.approx(0.5)
    mem.reinforce([a, b], -0.5)
    assert {(e.src, e.dst): e.weight for e in mem.edges()}[(a, b)] == pytest.approx((0.5 + lr * 0.5) * (1 - lr * 0.5))
    with pytest.raises(ValueError, match="reward"):
        mem.reinforce([a, b], 1.5)


def test_negative_reinforcement_prunes_below_floor(tmp_path):
    cfg = MemoryConfig(db_path=str(tmp_path / "m.db"), similar_edges_k=0, edge_learning_rate=0.5,
                       edge_prune_below=0.1)
    with MemoryService(cfg, DIM) as m:
        a, b = m.add("a", vector=unit(0)), m.add("b", vector=unit(1))
        m.add_edge(a, b, "answered_by", 0.3)
        m.reinforce([a, b], -1.0)  # 0.15
        assert len(m.edges()) == 1
        m.reinforce([a, b], -1.0)  # 0.075 < 0.1: pruned
        assert m.edges() == []


def test_decay_follows_the_documented_rule(mem, cfg):
    a, b, c = (mem.add(t, vector=unit(i)) for i, t in enumerate("abc"))
    mem.add_edge(a, b, "similar", 0.8)
    mem.add_edge(b, c, "similar", 0.021)
    t0 = max(e.updated_at for e in mem.edges())
    pruned = mem.decay(now=t0 + 10 * 86_400)
    assert pruned == 1  # 0.021 * 0.98**10 < 0.02
    (edge,) = mem.edges()
    expected = 0.8 * (1 - cfg.edge_decay_per_day) ** 10
    assert edge.weight == pytest.approx(expected, rel=1e-4)
    assert mem.decay(now=t0 + 10 * 86_400) == 0  # applying again at the same time changes nothing
    assert mem.edges()[0].weight == pytest.approx(expected, rel=1e-4)
    mem.decay(now=t0 + 15 * 86_400)  # compounding: 5 more days
    assert mem.edges()[0].weight == pytest.approx(0.8 * 0.98 ** 15, rel=1e-4)


def test_use_resets_the_decay_clock(mem):
    a, b = mem.add("a", vector=unit(0)), mem.add("b", vector=unit(1))
    mem.add_edge(a, b, "similar", 0.5)
    mem.mark_used([a, b])
    used_at = mem.edges()[0].updated_at
    mem.decay(now=used_at)  # no time since the use
    assert mem.edges()[0].weight == pytest.approx(0.5)


def test_mark_used_counts_nodes_and_edges(mem):
    a, b, c = (mem.add(t, vector=unit(i)) for i, t in enumerate("abc"))
    mem.add_edge(a, b, "followed_by", 0.5)
    mem.add_edge(a, c, "followed_by", 0.5)
    before = time.time()
    mem.mark_used([a, b])
    mem.mark_used([a])
    assert mem.get(a).use_count == 2 and mem.get(b).use_count == 1 and mem.get(c).use_count == 0
    assert mem.get(a).last_used_at >= before
    uses = {(e.src, e.dst): e.use_count for e in mem.edges()}
    assert uses == {(a, b): 1, (a, c): 0}


# ---- capacity -------------------------------------------------------------------------
def test_node_value_orders_by_quality_use_and_recency():
    now = 1_000_000.0
    base = node_value(np.array([0.5]), np.array([0]), np.array([now]), now)[0]
    assert node_value(np.array([0.9]), np.array([0]), np.array([now]), now)[0] > base
    assert node_value(np.array([0.5]), np.array([10]), np.array([now]), now)[0] > base
    assert node_value(np.array([0.5]), np.array([0]), np.array([now - 60 * 86_400]), now)[0] < base
    assert base == pytest.approx(0.4 * 0.5 + 0.3 * 0 + 0.3 * 1.0)


def test_eviction_removes_lowest_value_nodes_with_edges(tmp_path):
    cfg = MemoryConfig(db_path=str(tmp_path / "m.db"), similar_edges_k=0, max_nodes=10)
    with MemoryService(cfg, DIM) as m:
        low = [m.add(f"low{i}", vector=unit(i), quality=0.0) for i in range(3)]
        keep = [m.add(f"keep{i}", vector=unit(10 + i), quality=0.9) for i in range(7)]
        m.mark_used(keep[:2])
        m.add_edge(low[0], keep[0], "similar", 0.9)
        assert m.count() == 10
        extra = [m.add(f"new{i}", vector=unit(20 + i), quality=0.6) for i in range(3)]
        assert m.count() == 10
        survivors = {n.id for n in m.nodes()}
        assert survivors == set(keep) | set(extra)
        assert m.edges() == []  # the edge touching an evicted node went with it
        assert index_matches_sqlite(m)
        assert m.stats()["evicted"] == 3
        assert all(h.node_id in survivors for h in m.search(unit(0), k=10))


def test_explicit_evict_returns_victims(mem):
    ids = [mem.add(f"n{i}", vector=unit(i), quality=q) for i, q in enumerate([0.9, 0.1, 0.5])]
    assert mem.evict(1) == [ids[1]]
    assert mem.count() == 2 and index_matches_sqlite(mem)


# ---- archive --------------------------------------------------------------------------
def test_archive_hides_from_search_but_keeps_the_node(mem):
    ids = [mem.add(f"n{i}", vector=unit(i)) for i in range(10)]
    mem.archive(ids[:3])
    assert all(h.node_id not in ids[:3] for h in mem.search(unit(0), k=10))
    assert mem.count() == 7 and mem.count(include_archived=True) == 10
    assert mem.get(ids[0]).archived
    np.testing.assert_allclose(mem.vector(ids[0]), unit(0), atol=1e-6)
    assert index_matches_sqlite(mem) and len(mem.index) == 7


# ---- expand ---------------------------------------------------------------------------
@pytest.fixture
def chain(mem):
    """a -0.9- b -0.8- c -0.7- d, plus a -0.3- e (corrects) and an archived neighbour x of a."""
    ids = {t: mem.add(t, vector=unit(i), quality=0.6) for i, t in enumerate("abcdex")}
    mem.add_edge(ids["a"], ids["b"], "followed_by", 0.9)
    mem.add_edge(ids["c"], ids["b"], "similar", 0.8)  # reverse direction: expansion is undirected
    mem.add_edge(ids["c"], ids["d"], "answered_by", 0.7)
    mem.add_edge(ids["e"], ids["a"], "corrects", 0.3)
    mem.add_edge(ids["a"], ids["x"], "member_of", 1.0)
    mem.archive([ids["x"]])
    return mem, ids


def test_expand_k_hops(chain):
    mem, ids = chain
    names = {v: k for k, v in ids.items()}
    sg = mem.expand([ids["a"]], hops=0, max_nodes=10)
    assert [names[i] for i in sg.node_ids] == ["a"] and sg.num_edges == 0
    sg = mem.expand([ids["a"]], hops=1, max_nodes=10)
    assert [names[i] for i in sg.node_ids] == ["a", "b", "e"]  # strongest edge first; archived x skipped
    assert sg.hops.tolist() == [0, 1, 1]
    sg = mem.expand([ids["a"]], hops=3, max_nodes=10)
    assert [names[i] for i in sg.node_ids] == ["a", "b", "e", "c", "d"]
    assert sg.hops.tolist() == [0, 1, 1, 2, 3]


def test_expand_max_nodes_cap_and_seed_order(chain):
    mem, ids = chain
    sg = mem.expand([ids["a"]], hops=3, max_nodes=2)
    assert sg.node_ids == [ids["a"], ids["b"]]
    sg = mem.expand([ids["d"], ids["a"]], hops=1, max_nodes=10, seed_scores={ids["a"]: 0.9, ids["d"]: 0.4})
    assert sg.node_ids[:2] == [ids["a"], ids["d"]]
    assert sg.seed_scores[:2].tolist() == pytest.approx([0.9, 0.4]) and np.all(sg.seed_scores[2:] == 0)
    assert mem.expand([ids["a"]], hops=1, max_nodes=0).node_ids == []


def test_expand_builds_a_consistent_subgraph(chain):
    mem, ids = chain
    mem.mark_used([ids["a"], ids["b"]])
    sg = mem.expand([ids["a"], 12345], hops=3, max_nodes=10)  # unknown seed skipped
    assert isinstance(sg, Subgraph) and len(sg) == 5
    assert sg.vectors.shape == (5, DIM) and sg.vectors.dtype == np.float32
    np.testing.assert_allclose(sg.vectors[0], mem.vector(ids["a"]), atol=1e-6)
    assert sg.texts == [mem.get(i).text for i in sg.node_ids] and sg.kinds == ["interaction"] * 5
    assert sg.use_counts.tolist() == [1, 1, 0, 0, 0]
    assert np.all(sg.ages_s >= 0) and sg.quality.tolist() == pytest.approx([0.6] * 5)
    stored = {(e.src, e.dst, e.type): e for e in mem.edges() if e.src != ids["x"] and e.dst != ids["x"]}
    assert sg.num_edges == len(stored) == 4
    for k in range(sg.num_edges):
        src, dst = sg.node_ids[sg.edge_index[0, k]], sg.node_ids[sg.edge_index[1, k]]
        e = stored[(src, dst, EDGE_TYPES[sg.edge_type[k]])]
        assert sg.edge_weight[k] == pytest.approx(e.weight)
        assert sg.edge_use_count[k] == e.use_count
    ab = next(k for k in range(sg.num_edges) if sg.edge_index[0, k] == 0 and sg.edge_index[1, k] == 1)
    assert sg.edge_use_count[ab] == 1  # a and b were used together
    feats = sg.edge_features()
    assert feats.shape == (4, EDGE_FEATURE_DIM)
    np.testing.assert_allclose(feats[:, 1:1 + len(EDGE_TYPES)].sum(axis=1), 1.0)


def test_expand_of_nothing_is_empty(mem):
    sg = mem.expand([], hops=2)
    assert len(sg) == 0 and sg.vectors.shape == (0, DIM) and sg.num_edges == 0


# ---- writeback ------------------------------------------------------------------------
def test_enqueue_then_flush_writes_everything(mem):
    for i in range(50):
        mem.enqueue(f"q{i}", vector=unit(i), metadata={"i": i})
    mem.flush()
    assert mem.count() == 50
    assert sorted(n.metadata["i"] for n in mem.nodes()) == list(range(50))
    assert mem.search(unit(42), k=1)[0].text == "q42"
    assert index_matches_sqlite(mem)


def test_enqueue_batches_and_explicit_edges(tmp_path):
    cfg = MemoryConfig(db_path=str(tmp_path / "m.db"), similar_edges_k=0, writeback_batch_size=8,
                       writeback_interval_ms=5_000)
    with MemoryService(cfg, DIM) as m:
        anchor = m.add("anchor", vector=unit(0))
        for i in range(20):
            m.enqueue(f"q{i}", vector=unit(i + 1), edges=[(anchor, "followed_by", 0.4)])
        m.flush()
        stats = m.stats()["writeback"]
        assert stats["written"] == 20 and stats["pending"] == 0
        assert 3 <= stats["batches"] <= 20
        assert len([e for e in m.edges(anchor) if e.type == "followed_by"]) == 20


def test_close_writes_pending_and_rejects_later_writes(cfg):
    m = MemoryService(cfg, DIM)
    for i in range(30):
        m.enqueue(f"q{i}", vector=unit(i))
    m.close()
    m.close()  # idempotent
    with pytest.raises(MemoryStoreError, match="closed"):
        m.enqueue("late", vector=unit(99))
    with pytest.raises(MemoryStoreError, match="closed"):
        m.add("late", vector=unit(99))
    with MemoryService(cfg, DIM) as again:
        assert again.count() == 30


def test_writeback_reports_failed_batches_and_keeps_running():
    written: list[int] = []

    def write(batch):
        if any(x < 0 for x in batch):
            raise OSError("disk full")
        written.extend(batch)

    q = WritebackQueue(write, batch_size=4, interval_ms=10)
    q.enqueue(-1)
    with pytest.raises(MemoryStoreError, match="disk full"):
        q.flush()
    for i in range(10):
        q.enqueue(i)
    q.flush()
    q.close()
    assert sorted(written) == list(range(10))


def test_concurrent_adds_and_searches(mem):
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for i in range(25):
                mem.add(f"w{base + i}", vector=unit(base + i))
                mem.enqueue(f"e{base + i}", vector=unit(10_000 + base + i))
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            for i in range(50):
                mem.search(unit(i), k=3)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (0, 100, 200)] + \
              [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mem.flush()
    assert not errors
    assert mem.count() == 150 and index_matches_sqlite(mem)


# ---- persistence and operations -------------------------------------------------------
def test_reopen_loads_the_saved_index(cfg):
    with MemoryService(cfg, DIM) as m:
        ids = [m.add(f"n{i}", vector=unit(i)) for i in range(40)]
    with MemoryService(cfg, DIM) as m:
        assert m.open_report == {"index": "loaded", "added": 0, "tombstoned": 0}
        assert m.search(unit(17), k=1)[0].node_id == ids[17]


def test_missing_or_foreign_index_is_rebuilt(cfg, tmp_path):
    with MemoryService(cfg, DIM) as m:
        ids = [m.add(f"n{i}", vector=unit(i)) for i in range(20)]
    index_file = Path(cfg.db_path + ".faiss")
    index_file.unlink()
    with MemoryService(cfg, DIM) as m:
        assert m.open_report["index"] == "rebuilt" and m.open_report["added"] == 20
        assert m.search(unit(3), k=1)[0].node_id == ids[3]
    # an index saved by another store at the same path must not be trusted
    other = MemoryConfig(db_path=str(tmp_path / "other.db"), similar_edges_k=0)
    with MemoryService(other, DIM) as o:
        for i in range(5):
            o.add(f"other{i}", vector=unit(500 + i))
    Path(other.db_path + ".faiss").replace(index_file)
    Path(other.db_path + ".faiss.json").replace(cfg.db_path + ".faiss.json")
    with MemoryService(cfg, DIM) as m:
        assert m.open_report["index"] == "rebuilt"
        assert m.search(unit(3), k=1)[0].text == "n3" and index_matches_sqlite(m)


def test_stale_index_is_reconciled(cfg):
    with MemoryService(cfg, DIM) as m:
        ids = [m.add(f"n{i}", vector=unit(i)) for i in range(20)]
    snapshot = {p: Path(p).read_bytes() for p in (cfg.db_path + ".faiss", cfg.db_path + ".faiss.json")}
    with MemoryService(cfg, DIM) as m:
        new = [m.add(f"new{i}", vector=unit(100 + i)) for i in range(5)]
        m.archive(ids[:2])
    for p, data in snapshot.items():  # put back the older index, as if the last save never happened
        Path(p).write_bytes(data)
    with MemoryService(cfg, DIM) as m:
        assert m.open_report == {"index": "loaded", "added": 5, "tombstoned": 2}
        assert index_matches_sqlite(m)
        assert m.search(unit(102), k=1)[0].node_id == new[2]
        assert all(h.node_id not in ids[:2] for h in m.search(unit(0), k=25))


def test_stats_and_ping(mem):
    a = mem.add("a", vector=unit(0))
    b = mem.add("b", kind="document", vector=unit(1))
    mem.add_edge(a, b, "similar", 0.5)
    s = mem.stats()
    assert s["nodes"] == 2 and s["edges"] == 1 and s["index_vectors"] == 2
    assert s["nodes_by_kind"] == {"interaction": 1, "document": 1} and s["edges_by_type"] == {"similar": 1}
    assert s["index_bytes"] > 2 * DIM * 4 and s["db_bytes"] > 0 and s["mean_edge_weight"] == pytest.approx(0.5)
    latency = mem.ping()
    assert math.isfinite(latency) and latency >= 0


# ---- with the real embedder -----------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from ruvllm_lab.embedding import EmbeddingService
    return EmbeddingService(EmbeddingConfig())


def test_text_memory_with_real_embeddings(tmp_path, minilm):
    cfg = MemoryConfig(db_path=str(tmp_path / "m.db"), similar_edges_k=3, similar_edge_min_score=0.4)
    with MemoryService(cfg, minilm.dimension, embedder=minilm) as m:
        facts = ["The Eiffel Tower is in Paris.", "Python lists are mutable sequences.",
                 "Mitochondria produce energy in cells.", "The Louvre museum is located in Paris, France.",
                 "Tuples in Python cannot be changed after creation."]
        ids = [m.add(t) for t in facts]
        m.enqueue("Paris is the capital of France.")
        m.flush()
        hits = m.search("Which monuments can I visit in Paris?", k=3)
        assert {h.node_id for h in hits[:2]} <= {ids[0], ids[3], ids[0] + 5}
        assert hits[0].text in (facts[0], facts[3], "Paris is the capital of France.")
        python_hits = m.search("How do Python lists and tuples differ?", k=2)
        assert {h.node_id for h in python_hits} == {ids[1], ids[4]}
        # the two Python facts are linked by a similar edge; the biology fact is linked to neither
        linked = {(e.src, e.dst) for e in m.edges()}
        assert (ids[4], ids[1]) in linked
        assert not any(ids[2] in pair for pair in linked)


def test_index_searches_and_adds_run_with_the_configured_openmp_threads():
    """memory.index_threads: OpenMP keeps its thread count per calling thread, so the index sets it on
    every call, whichever thread (request, writeback worker) makes it (benches/decode_interference.py)."""
    import threading

    import faiss

    from ruvllm_lab.memory.vectors import VectorIndex, clustered_unit_vectors

    vectors = clustered_unit_vectors(200, 16, clusters=4, seed=0)
    index = VectorIndex(16, threads=1)
    seen = {}

    def work():
        faiss.omp_set_num_threads(2)  # what this thread had before
        index.add(np.arange(200), vectors)
        seen["after_add"] = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(2)
        index.search(vectors[:1], 3)
        seen["after_search"] = faiss.omp_get_max_threads()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == {"after_add": 1, "after_search": 1}


def test_expanded_quality_is_the_stored_value_so_the_note_gate_compares_it_exactly(mem):
    """0.7 is not a float32: the gate must see the stored 0.7, not 0.69999999, against min_note_quality."""
    from ruvllm_lab.config import Config
    from ruvllm_lab.context import ContextBuilder

    meta = {"verification": "rated", "question": "What is the capital of Greece?"}
    node = mem.add("Q: What is the capital of Greece?\nA: Athens", metadata=meta, vector=basis(0), quality=0.7)
    sg = mem.expand([node])
    assert float(sg.quality[0]) == 0.7 and sg.metadata[0] == meta
    cfg = Config.from_dict({"retrieval": {"min_note_quality": 0.7}})
    builder = ContextBuilder(cfg.retrieval, cfg.prompt, mem, attention=None, count_tokens=len, dimension=DIM)
    assert builder.admits("What is the capital of Greece?", basis(0), sg, 0, tenant=None)
