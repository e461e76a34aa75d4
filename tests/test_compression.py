"""Compression: k selection, keywords, subject parsing, faithfulness, and the real job on a
three-topic memory with the real smollm2-135m tier, MiniLM embeddings, faiss and SQLite."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ruvllm_lab.compression import (cluster, cluster_keywords, faithfulness, kmeans_bic, parse_subject,
                                    summary_text)
from ruvllm_lab.config import CompressionConfig, Config

TOPICS = {
    "cooking": ["Knead the bread dough for ten minutes before letting it rise.",
                "Simmer the tomato sauce with garlic and basil for a rich pasta recipe.",
                "Preheat the oven to 200 degrees before baking the chicken.",
                "A good risotto recipe needs slow stirring and warm stock.",
                "Whisk eggs and sugar together to make a fluffy cake batter.",
                "Season the soup with salt, pepper and fresh herbs before serving.",
                "Chop onions finely and fry them in butter until golden.",
                "Marinate the beef overnight so the stew is tender."],
    "astronomy": ["Jupiter is the largest planet in our solar system.",
                  "A light year measures the distance light travels in one year.",
                  "The Andromeda galaxy is the nearest large galaxy to the Milky Way.",
                  "Telescopes let astronomers observe distant stars and nebulae.",
                  "A supernova is the explosion of a massive star at the end of its life.",
                  "The Moon orbits the Earth roughly every 27 days.",
                  "Black holes have gravity so strong that not even light escapes.",
                  "Saturn's rings are made of ice and rock particles orbiting the planet."],
    "football": ["The striker scored a goal in the final minute of the match.",
                 "The goalkeeper saved a penalty kick to win the football game.",
                 "Each football team has eleven players on the pitch.",
                 "The referee showed a red card after a dangerous tackle.",
                 "The midfielder passed the ball to the winger on the left.",
                 "The league champions lifted the trophy after the last match of the season.",
                 "A football match lasts ninety minutes plus stoppage time.",
                 "Fans cheered in the stadium as their team scored a second goal."],
}
# words that name each topic (or its core vocabulary); a concept must mention one
TOPIC_WORDS = {
    "cooking": {"cooking", "cook", "food", "recipe", "recipes", "baking", "kitchen", "cuisine", "dish", "meal",
                "oven", "dough", "sauce", "bread"},
    "astronomy": {"astronomy", "space", "planet", "planets", "galaxy", "star", "stars", "solar", "universe",
                  "cosmos", "moon", "telescope", "astronomers"},
    "football": {"football", "soccer", "sport", "sports", "match", "goal", "team", "league", "player", "players",
                 "referee", "goalkeeper", "striker"},
}
QUERIES = {"cooking": "how do I bake bread and make pasta sauce?",
           "astronomy": "which planets and galaxies are in space?",
           "football": "who scored the goal in the football match?"}


def _blobs(k=3, per=10, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[:k] * 5
    x = np.concatenate([c + rng.normal(0, 0.3, (per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), per)


def _same_partition(a, b) -> bool:
    return len({(int(x), int(y)) for x, y in zip(a, b)}) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method,selection", [("kmeans", "silhouette"), ("kmeans", "bic"), ("gmm", "bic"),
                                              ("gmm", "silhouette")])
def test_cluster_selects_true_k_on_separated_blobs(method, selection):
    x, truth = _blobs()
    cfg = CompressionConfig(method=method, k_selection=selection, k_min=2, k_max=8)
    labels, k, scores = cluster(x, cfg, seed=0)
    assert k == 3, scores
    assert _same_partition(labels, truth)
    assert set(scores) <= set(range(2, 9))


def test_kmeans_bic_prefers_true_partition():
    x, truth = _blobs()
    merged = np.where(truth == 2, 1, truth)
    assert kmeans_bic(x, truth, 3) < kmeans_bic(x, merged, 2)
    assert math.isinf(kmeans_bic(x[:2], np.array([0, 1]), 2))


def test_cluster_handles_too_few_points():
    x, _ = _blobs(k=1, per=2)
    labels, k, scores = cluster(x, CompressionConfig(k_min=2, k_max=4))
    assert k == 1 and (labels == 0).all() and scores == {}


def test_cluster_keywords_pick_distinctive_terms():
    texts = TOPICS["cooking"][:4] + TOPICS["football"][:4]
    labels = np.array([0] * 4 + [1] * 4)
    kw = cluster_keywords(texts, labels, top=8)
    assert "recipe" in kw[0] and "football" in kw[1]
    assert not set(kw[0]) & {"the", "and", "a"}


def test_parse_subject_and_faithfulness():
    assert parse_subject('The subject of these sentences is "food"') == "food"
    assert parse_subject('It is "solar system" and "galaxy" but "solar system"') == "solar system, galaxy"
    assert parse_subject("The topic of these notes is cooking. More text") == "cooking"
    assert parse_subject("") == ""
    assert parse_subject('The subject of the sentence is "Fan cheers in the stadium."') == "Fan cheers in the stadium"
    assert parse_subject("Subject: astronomy and planets") == "Subject: astronomy and planets"
    assert parse_subject("The main topic is space travel and rockets and much more here too") == \
        "space travel and rockets and much more here"
    assert faithfulness("Baking bread and cooking recipes", ["bake", "bread", "recipe", "goal"]) == pytest.approx(0.75)
    assert faithfulness("planets", ["planet"]) == 1.0
    assert faithfulness("cooking", ["cook", "cooked"]) == 1.0
    assert faithfulness("start", ["art"]) == 0.0
    assert math.isnan(faithfulness("x", []))
    assert summary_text("food", ["oven", "dough"]) == "food. Key terms: oven, dough"
    assert summary_text("", []) == "Untitled"


# ---- the real job -------------------------------------------------------------------------------------
@pytest.fixture
def topic_store(tmp_path):
    """A real MemoryService (MiniLM embeddings) holding the three topics, plus the real pool."""
    from ruvllm_lab.embedding import EmbeddingService
    from ruvllm_lab.inference import InferencePool
    from ruvllm_lab.memory import MemoryService

    cfg = Config.from_dict({}, {"inference.models": ["smollm2-135m"], "memory.db_path": str(tmp_path / "m.db"),
                                "system.data_dir": str(tmp_path / "state"), "compression.k_max": 8})
    embedder = EmbeddingService(cfg.embedding)
    memory = MemoryService(cfg.memory, dimension=cfg.embedding.dimension, embedder=embedder)
    ids = {topic: [memory.add(s, kind="document") for s in sents] for topic, sents in TOPICS.items()}
    pool = InferencePool(cfg.inference, cfg.system)
    yield cfg, memory, pool, embedder, ids
    pool.close()
    memory.close()


def _topic_of(text: str) -> set[str]:
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    return {t for t, vocab in TOPIC_WORDS.items() if words & vocab}


@pytest.mark.slow
@pytest.mark.model
def test_three_topics_become_named_concepts_reachable_by_query(topic_store):
    from ruvllm_lab.compression import compress_memory

    cfg, memory, pool, embedder, ids = topic_store
    eval_queries = [(QUERIES[t], ids[t]) for t in TOPICS]
    report = compress_memory(memory, pool, cfg.compression, embedder=embedder, eval_queries=eval_queries,
                             recall_k=3)
    for c in report.concepts:
        print(f"\nlevel {c.level} members {len(c.member_ids)} faithfulness {c.faithfulness:.2f}: "
              f"reply={c.reply!r} -> {c.text!r}")
    level1 = [c for c in report.concepts if c.level == 1]
    assert len(level1) >= 3 and report.levels[0]["k"] == 3
    concept_of = {}
    for topic, member_ids in ids.items():
        owners = [c for c in level1 if set(member_ids) <= set(c.member_ids)]
        assert len(owners) == 1, f"{topic} members were split across concepts"
        concept_of[topic] = owners[0]
        assert topic in _topic_of(owners[0].text), (topic, owners[0].text)
        stored = memory.get(owners[0].node_id)
        assert stored.kind == "concept" and stored.text == owners[0].text
    # members are linked to their concept
    member_edges = [e for e in memory.edges() if e.type == "member_of"]
    assert len(member_edges) >= 24
    # a query about a topic reaches that topic's concept
    for topic, query in QUERIES.items():
        hits = memory.search(query, 3)
        assert concept_of[topic].node_id in [h.node_id for h in hits], (topic, [(h.kind, h.text) for h in hits])
    assert report.nodes_after == report.nodes_before + len(report.concepts)
    assert report.index_bytes_after > report.index_bytes_before
    assert report.recall_before == 1.0 and report.recall_after_collapsed == 1.0
    assert report.mean_faithfulness is not None and 0.0 <= report.mean_faithfulness <= 1.0
    # running again does not re-cluster members that already belong to a concept
    again = compress_memory(memory, pool, cfg.compression, embedder=embedder)
    assert [c for c in again.concepts if c.level == 1] == []


@pytest.mark.slow
@pytest.mark.model
def test_archiving_members_shrinks_the_index_and_concepts_keep_recall(topic_store):
    from ruvllm_lab.compression import compress_memory

    cfg, memory, pool, embedder, ids = topic_store
    ccfg = CompressionConfig(archive_members=True, k_max=8, max_depth=1)
    eval_queries = [(QUERIES[t], ids[t]) for t in TOPICS]
    report = compress_memory(memory, pool, ccfg, embedder=embedder, eval_queries=eval_queries, recall_k=3)
    assert report.archived == 24 and memory.count() == report.nodes_after == 3
    assert report.index_bytes_after < report.index_bytes_before
    assert report.recall_after == 0.0  # members left the index ...
    assert report.recall_after_collapsed == 1.0  # ... and are reached through their concept
    assert memory.count(include_archived=True) == 27


@pytest.mark.slow
@pytest.mark.model
def test_compress_store_cli_entry_point(tmp_path):
    from ruvllm_lab.compression import compress_store
    from ruvllm_lab.embedding import EmbeddingService
    from ruvllm_lab.memory import MemoryService

    cfg = Config.from_dict({}, {"inference.models": ["smollm2-135m"], "memory.db_path": str(tmp_path / "m.db"),
                                "system.data_dir": str(tmp_path / "state"), "compression.max_depth": 1})
    with MemoryService(cfg.memory, cfg.embedding.dimension, embedder=EmbeddingService(cfg.embedding)) as memory:
        for sents in TOPICS.values():
            for s in sents:
                memory.add(s, kind="interaction")
    out = compress_store(cfg)
    assert out["tier"] == "smollm2-135m" and len(out["concepts"]) >= 3
    assert out["nodes_after"] == 24 + len(out["concepts"])
    with MemoryService(cfg.memory, cfg.embedding.dimension) as memory:
        assert memory.count("concept") == len(out["concepts"])
    disabled = compress_store(cfg.with_overrides({"compression.enabled": False}))
    assert "skipped" in disabled


@pytest.mark.slow
@pytest.mark.model
def test_ruvllm_runs_compression_periodically_in_the_background(tmp_path):
    import time

    from ruvllm_lab import RuvLLM

    from .conftest import ROOT
    cfg = Config.load(ROOT / "configs/edge.toml", overrides={
        "memory.db_path": str(tmp_path / "m.db"), "system.data_dir": str(tmp_path / "state"),
        "learning.enabled": False, "compression.interval_ms": 1000, "compression.max_depth": 1})
    with RuvLLM(cfg, start_background_learning=True) as llm:
        for sents in TOPICS.values():
            for s in sents:
                llm.memory.add(s, kind="document")
        deadline = time.monotonic() + 300  # a hang guard, not a speed assertion
        while llm.memory.count("concept") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        concepts = llm.memory.nodes("concept")
    assert len(concepts) >= 2
    assert not llm._compression_thread.is_alive()  # close() stopped the job


# ---- held-out paraphrases, budgeted retrieval, storage and the experiment --------------------------------
def test_every_generated_query_has_a_deterministic_paraphrase_that_is_not_the_stored_wording():
    from ruvllm_lab import workloads
    from ruvllm_lab.experiments.compression import paraphrase

    items = workloads.generate(None, 400, seed=3, distinct=True)
    assert set(workloads.family_counts(items)) == set(workloads.FAMILIES)
    for it in items:
        p = paraphrase(it, seed=0)
        assert p != it.query and p.strip(), it.query
        assert paraphrase(it, seed=0) == p  # a function of (seed, query)
    numbers = [it for it in items if it.family == "arithmetic"]
    # the operands survive the rewording, so the stored answer still answers it
    for it in numbers[:20]:
        a, b = it.query.split("?")[0].split()[2::2]
        assert a in paraphrase(it) and b in paraphrase(it)
    with pytest.raises(ValueError, match="no paraphrase"):
        paraphrase(workloads.WorkItem("Tell me a joke.", "no", "custom", 1))


def test_every_knowledge_fact_has_paraphrases():
    from ruvllm_lab.experiments.compression import load_paraphrases
    from ruvllm_lab.workloads import load_knowledge

    table = load_paraphrases()
    for fact in load_knowledge():
        assert len(table[fact.fact]) >= 2 and fact.question not in table[fact.fact], fact.id


def test_summary_gives_mean_and_bootstrap_ci_over_seeds_and_none_for_one_seed():
    import pandas as pd

    from ruvllm_lab.experiments.compression import METRICS, summarise

    rows = [{"seed": s, "clusters": 4, "depth": 1, "mode": "descent", **{m: 0.2 * s for m in METRICS}}
            for s in range(1, 6)]
    rows.append({"seed": 0, "clusters": 0, "depth": 0, "mode": "flat", **{m: 1.0 for m in METRICS}})
    out = summarise(pd.DataFrame(rows)).set_index("mode")
    d = out.loc["descent"]
    assert d["n_seeds"] == 5 and d["recall"] == pytest.approx(0.6)
    assert 0.2 < d["recall_ci_low"] < 0.6 < d["recall_ci_high"] < 1.0
    assert out.loc["flat", "recall"] == 1.0 and math.isnan(out.loc["flat", "recall_ci_low"])


def test_fill_budget_stops_at_the_first_node_that_does_not_fit():
    from ruvllm_lab.compression import fill_budget

    ranked = [(1, "a b c"), (2, "d e"), (3, "f g h i"), (4, "j")]
    ids, texts, total = fill_budget(ranked, 6, lambda t: len(t.split()))
    assert ids == [1, 2] and total == 5  # node 3 (4 tokens) ends the context; node 4 would fit but is not taken
    assert fill_budget(ranked, 2, lambda t: len(t.split()))[0] == []


@pytest.fixture(scope="module")
def minilm():
    from ruvllm_lab.embedding import EmbeddingService
    return EmbeddingService(Config.from_dict({}, {}).embedding)


def test_descent_cost_counts_children_and_storage_keeps_archived_rows(tmp_path, minilm):
    """Real MiniLM, faiss and SQLite; extractive summaries, so no model is needed."""
    from ruvllm_lab import workloads
    from ruvllm_lab.compression import TreeRetriever, compress_memory, concept_children, storage_bytes
    from ruvllm_lab.experiments.compression import interaction_text, paraphrase
    from ruvllm_lab.memory import MemoryService

    cfg = Config.from_dict({}, {"memory.db_path": str(tmp_path / "m.db")})
    items = workloads.generate(None, 120, seed=1, distinct=True)
    with MemoryService(cfg.memory, cfg.embedding.dimension, embedder=minilm) as memory:
        ids = [memory.add(interaction_text(it), kind="interaction") for it in items]
        before = storage_bytes(memory)
        flat = TreeRetriever(memory, minilm.count_tokens, budget=64, beam=2)
        assert flat.k_fetch < len(items)  # the first search cannot return everything
        report = compress_memory(memory, None, CompressionConfig(k_min=8, k_max=8, max_depth=1, min_cluster_size=1,
                                                                 archive_members=True), embedder=minilm)
        assert len(report.concepts) == 8 and all(c.text.startswith("Key terms:") for c in report.concepts)
        after = storage_bytes(memory)
        assert len(memory.index) == 8
        assert after["db_bytes"] >= before["db_bytes"]  # archived rows are still stored
        assert after["index_bytes"] < before["index_bytes"]
        tree = TreeRetriever(memory, minilm.count_tokens, budget=64, beam=2)
        children = concept_children(memory)
        assert sorted(m for ms in children.values() for m in ms) == sorted(ids)
        q = minilm.embed_one(paraphrase(items[0]))
        r = tree(q, "descent")
        top = sorted(children, key=lambda c: -float(memory.vector(c) @ q))[:2]
        expanded = sum(len(children[c]) for c in top)
        assert 0 < r.vectors_scored - expanded <= len(memory.index)  # the HNSW search over 8 concepts, plus descent
        assert set(r.node_ids) <= set().union(*(children[c] for c in top)) and r.tokens <= 64
        c = tree(q, "collapsed")
        assert c.tokens <= 64 and c.node_ids and len(tree.collapsed_index()) == len(items) + 8


@pytest.mark.slow
def test_recall_drops_below_one_on_held_out_questions_at_a_fixed_budget(tmp_path, minilm):
    """The experiment without a model (extractive summaries, no answers): real MiniLM, faiss, SQLite."""
    from ruvllm_lab.experiments.compression import run
    from ruvllm_lab.experiments.tracking import MemoryTracker

    cfg = Config.from_dict({}, {"memory.db_path": str(tmp_path / "unused.db")})
    tracker = MemoryTracker()
    with pytest.warns(UserWarning, match="underpowered"):
        res = run(cfg, n_interactions=120, cluster_counts=(4, 12), depths=(1, 2), seeds=(0,), n_eval=30,
                  token_budget=64, beam=1, summaries="extractive", answer_quality=False, embedder=minilm,
                  work_dir=tmp_path, tracker=tracker, progress=False)
    s = res.summary.set_index(["clusters", "depth", "mode"])
    print("\n" + res.to_markdown())
    assert res.underpowered == ["1 seed(s) < 5"]
    flat = s.loc[(0, 0, "flat")]
    assert flat["ratio_nodes"] == 1.0 and flat["ratio_bytes"] == 1.0
    descent = s.xs("descent", level="mode")
    assert (descent["recall"] < 1.0).any()  # held-out wording and a budget: compression loses answers
    # archived rows stay in SQLite: bytes shrink far less than the index does
    assert (descent["ratio_nodes"] > 1.0).all() and (descent["ratio_bytes"] < descent["ratio_nodes"] / 4).all()
    collapsed = s.xs("collapsed", level="mode")
    assert (collapsed["ratio_nodes"] < 1.0).all() and (collapsed["ratio_bytes"] < 1.0).all()  # indexes more
    assert (res.per_seed["context_tokens"] <= 64).all() and (res.per_seed["vectors_scored"] > 0).all()
    assert len(res.answers) == 30 * (1 + 2 * 2 * 2) and "correct" not in res.answers
    assert not set(res.answers["question"]) & set(res.answers["stored_query"])  # never the stored wording
    assert tracker.metrics["c4_d1_descent/recall"][0][1] == pytest.approx(s.loc[(4, 1, "descent"), "recall"])
