"""GraphAttentionEngine on synthetic subgraphs (real torch_geometric GATv2Conv, no mocks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ruvllm_lab.attention import NODE_EXTRA_FEATURES, GraphAttentionEngine, cosine_to_query, node_features
from ruvllm_lab.config import AttentionConfig
from ruvllm_lab.errors import DimensionMismatch
from ruvllm_lab.graph import EDGE_FEATURE_DIM, EDGE_TYPES, Subgraph

DIM = 24


def _unit(v):
    return (v / np.linalg.norm(v)).astype(np.float32)


def _with_similarity(q, sim, rng):
    """A unit vector whose cosine with unit q is `sim`."""
    r = rng.normal(size=q.shape)
    r -= (r @ q) * q
    return _unit(sim * q + np.sqrt(max(1 - sim ** 2, 0.0)) * _unit(r))


def planted_graph(seed: int, n: int = 20):
    """A query and a subgraph whose one relevant node is *not* the most similar.

    The relevant node is a high-quality correction attached by a 'corrects' edge to the best
    search hit, with low similarity (0.15–0.3).  Distractors: search hits and neighbours with
    higher similarity, plus low-quality corrections two hops out."""
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=DIM))
    n_hits = 5
    sims = np.concatenate([np.sort(rng.uniform(0.45, 0.9, n_hits))[::-1], rng.uniform(0.2, 0.6, n - n_hits - 1),
                           [rng.uniform(0.15, 0.3)]])
    vectors = np.stack([_with_similarity(q, s, rng) for s in sims])
    kinds = ["interaction"] * n
    hops = np.array([0] * n_hits + [1] * (n - n_hits))
    quality = rng.uniform(0.2, 0.7, n)
    planted = n - 1
    kinds[planted], quality[planted] = "correction", rng.uniform(0.9, 1.0)
    for d in range(n_hits, n_hits + 3):  # decoy corrections: low quality, further away
        kinds[d], hops[d], quality[d] = "correction", 2, rng.uniform(0.1, 0.4)
    src, dst, etype = [], [], []
    for i in range(n_hits, n - 1):  # every expanded node hangs off a random hit
        src.append(int(rng.integers(n_hits)))
        dst.append(i)
        etype.append(EDGE_TYPES.index("similar"))
    src.append(planted)
    dst.append(0)
    etype.append(EDGE_TYPES.index("corrects"))
    e = len(src)
    sg = Subgraph(
        node_ids=[1000 + seed * 100 + i for i in range(n)], texts=[f"memory {i} " * (1 + i % 4) for i in range(n)],
        kinds=kinds, vectors=vectors, seed_scores=np.where(hops == 0, sims, 0.0).astype(np.float32), hops=hops,
        use_counts=rng.integers(0, 10, n), ages_s=rng.uniform(0, 1e6, n).astype(np.float32),
        quality=quality.astype(np.float32), edge_index=np.array([src, dst], np.int64),
        edge_weight=rng.uniform(0.3, 1.0, e).astype(np.float32), edge_type=np.array(etype, np.int64),
        edge_age_s=rng.uniform(0, 1e5, e).astype(np.float32), edge_use_count=rng.integers(0, 5, e).astype(np.float32))
    return q, sg, sg.node_ids[planted]


def engine(**kw) -> GraphAttentionEngine:
    cfg = dict(heads=2, hidden_dim=16, learning_rate=0.01)
    cfg.update(kw)
    return GraphAttentionEngine(AttentionConfig(**cfg), DIM, seed=0)


@pytest.fixture(scope="module")
def trained_engine():
    eng = engine()
    train = [(q, sg, [pid]) for q, sg, pid in (planted_graph(s) for s in range(40))]
    report = eng.fit(train, epochs=6)
    return eng, report


def count_words(text: str) -> int:
    return len(text.split())


# ---- features ------------------------------------------------------------------------------------------------
def test_node_features_shapes_and_query_node():
    q, sg, _ = planted_graph(0)
    x, edge_index, edge_attr = node_features(q, sg)
    n, seeds = len(sg), int((sg.hops == 0).sum())
    assert x.shape == (n + 1, DIM + NODE_EXTRA_FEATURES)
    np.testing.assert_allclose(x[-1, :DIM].numpy(), q)
    assert x[-1, -1] == 1.0 and torch.all(x[:-1, -1] == 0)
    assert edge_index.shape == (2, 2 * sg.num_edges + 2 * seeds)
    assert edge_attr.shape == (edge_index.shape[1], EDGE_FEATURE_DIM)


def test_query_edges_link_only_the_search_hits():
    q, sg, _ = planted_graph(1)
    _, edge_index, edge_attr = node_features(q, sg)
    n = len(sg)
    from_query = edge_index[0] == n
    assert sorted(edge_index[1][from_query].tolist()) == np.flatnonzero(sg.hops == 0).tolist()
    assert torch.all(edge_attr[from_query, 1 + EDGE_TYPES.index("similar")] == 1.0)
    np.testing.assert_allclose(edge_attr[from_query, 0].numpy(), sg.seed_scores[edge_index[1][from_query].numpy()])


def test_kind_one_hot_and_scalars():
    q, sg, planted = planted_graph(2)
    x, _, _ = node_features(q, sg)
    i = sg.node_ids.index(planted)
    assert x[i, DIM + 4 + 2] == 1.0  # "correction" is NODE_KINDS[2]
    assert x[i, DIM + 3] == pytest.approx(float(sg.quality[i]))
    assert x[i, DIM + 1] == pytest.approx(sg.hops[i] / 2.0)


# ---- untrained ranking ----------------------------------------------------------------------------------------
def test_untrained_ranks_by_similarity_and_says_so():
    q, sg, _ = planted_graph(3)
    eng = engine()
    assert not eng.trained and eng.rank_method == "similarity"
    ranked = eng.rank(q, sg)
    sims = cosine_to_query(q, sg.vectors)
    assert [nid for nid, _ in ranked] == [sg.node_ids[i] for i in np.argsort(-sims, kind="stable")]
    assert [s for _, s in ranked] == pytest.approx(sorted(sims, reverse=True), abs=1e-5)


def test_untrained_does_not_find_the_planted_node():
    q, sg, planted = planted_graph(4)
    assert engine().rank(q, sg)[0][0] != planted


def test_empty_subgraph_ranks_nothing():
    eng = engine()
    assert eng.rank(np.ones(DIM, np.float32), Subgraph.empty(DIM)) == []


def test_dimension_mismatch_is_clear():
    q, sg, _ = planted_graph(5)
    with pytest.raises(DimensionMismatch, match="dimension 24, got 8"):
        engine().rank(np.ones(8, np.float32), sg)
    sg.vectors = np.ones((len(sg), 8), np.float32)
    with pytest.raises(DimensionMismatch):
        engine().rank(q, sg)


# ---- context selection ------------------------------------------------------------------------------------------
def test_select_context_fits_the_budget_and_keeps_rank_order():
    q, sg, _ = planted_graph(6)
    eng = engine()
    ranked = eng.rank(q, sg)
    chosen = eng.select_context(q, sg, token_budget=12, count_tokens=count_words)
    text_of = dict(zip(sg.node_ids, sg.texts))
    assert sum(count_words(text_of[nid]) for nid, _ in chosen) <= 12
    order = [nid for nid, _ in ranked]
    assert [order.index(nid) for nid, _ in chosen] == sorted(order.index(nid) for nid, _ in chosen)


def test_select_context_skips_an_item_that_does_not_fit_and_continues():
    q, sg, _ = planted_graph(7)
    eng = engine()
    ranked = eng.rank(q, sg)
    text_of = dict(zip(sg.node_ids, sg.texts))
    first_cost = count_words(text_of[ranked[0][0]])
    huge = ranked[1][0]
    sg.texts[sg.node_ids.index(huge)] = "word " * 1000
    chosen = [nid for nid, _ in eng.select_context(q, sg, token_budget=first_cost + 4, count_tokens=count_words)]
    assert chosen[0] == ranked[0][0] and huge not in chosen and len(chosen) >= 2


def test_select_context_default_budget_and_max_items():
    q, sg, _ = planted_graph(8)
    eng = engine(context_token_budget=5)
    text_of = dict(zip(sg.node_ids, sg.texts))
    chosen = eng.select_context(q, sg, None, count_words)
    assert sum(count_words(text_of[nid]) for nid, _ in chosen) <= 5
    assert len(engine().select_context(q, sg, 10_000, count_words, max_items=3)) == 3
    assert engine().select_context(q, sg, 0, count_words) == []


# ---- training --------------------------------------------------------------------------------------------------
def test_train_step_returns_loss_and_marks_trained():
    q, sg, planted = planted_graph(9)
    eng = engine()
    gat_before = [p.detach().clone() for p in eng.net.gat.parameters()]
    loss = eng.train_step(q, sg, [planted])
    assert np.isfinite(loss) and loss > 0 and eng.trained and eng.rank_method == "gatv2"
    assert any(not torch.equal(a, b) for a, b in zip(gat_before, eng.net.gat.parameters()))


def test_repeated_steps_lower_the_loss():
    q, sg, planted = planted_graph(10)
    eng = engine()
    losses = [eng.train_step(q, sg, [planted]) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_explicit_negatives_restrict_the_contrast():
    q, sg, planted = planted_graph(11)
    eng = engine()
    few = eng.loss(q, sg, [planted], negative_ids=sg.node_ids[:2]).item()
    all_ = eng.loss(q, sg, [planted]).item()
    assert few < all_  # fewer competitors -> smaller listwise loss


def test_bad_training_ids_are_rejected():
    q, sg, planted = planted_graph(12)
    eng = engine()
    with pytest.raises(ValueError, match="not in the subgraph"):
        eng.train_step(q, sg, [-5])
    with pytest.raises(ValueError, match="at least one positive"):
        eng.train_step(q, sg, [])
    with pytest.raises(ValueError):
        eng.fit([])


def test_trained_engine_ranks_the_planted_node_first(trained_engine):
    eng, report = trained_engine
    assert report["loss_last_epoch"] < report["loss_first_epoch"]
    firsts = []
    for seed in range(100, 120):  # held-out graphs
        q, sg, planted = planted_graph(seed)
        firsts.append(eng.rank(q, sg)[0][0] == planted)
    assert np.mean(firsts) >= 0.9
    q, sg, planted = planted_graph(4)
    assert eng.rank(q, sg)[0][0] == planted  # the graph the untrained engine got wrong
    scores = [s for _, s in eng.rank(q, sg)]
    assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("concat", [True, False])
def test_heads_concatenated_or_averaged(concat):
    eng = engine(concat_heads=concat, heads=3)
    out_dim = 16 * 3 if concat else 16
    assert eng.net.score[0].in_features == 2 * out_dim + 16
    q, sg, planted = planted_graph(13)
    eng.train_step(q, sg, [planted])
    assert len(eng.rank(q, sg)) == len(sg)


def test_same_seed_same_engine():
    q, sg, planted = planted_graph(14)
    a, b = engine(), engine()
    assert a.train_step(q, sg, [planted]) == pytest.approx(b.train_step(q, sg, [planted]))
    assert a.rank(q, sg) == b.rank(q, sg)


# ---- persistence -------------------------------------------------------------------------------------------------
def test_save_load_round_trip(trained_engine, tmp_path):
    eng, _ = trained_engine
    path = eng.save(tmp_path / "attention_weights.pt")
    fresh = GraphAttentionEngine(eng.config, DIM, seed=7).load(path)
    assert fresh.trained and fresh.steps == eng.steps
    q, sg, _ = planted_graph(15)
    assert [n for n, _ in fresh.rank(q, sg)] == [n for n, _ in eng.rank(q, sg)]
    np.testing.assert_allclose(fresh.scores(q, sg), eng.scores(q, sg), atol=1e-6)


def test_load_rejects_other_dimension(trained_engine, tmp_path):
    eng, _ = trained_engine
    path = eng.save(tmp_path / "a.pt")
    with pytest.raises(DimensionMismatch):
        GraphAttentionEngine(eng.config, DIM + 1).load(path)
