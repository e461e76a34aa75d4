"""One contract for every memory backend: the same tests on SQLite + faiss and on PostgreSQL + pgvector.

PostgreSQL is real (``pg_dsn``: the pgserver wheel, started by the tests); every test gets a
fresh store (SQLite file in tmp_path, or a fresh PostgreSQL schema).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict

import numpy as np
import pytest

from ruvllm_lab.config import MemoryConfig
from ruvllm_lab.errors import DimensionMismatch
from ruvllm_lab.memory import MemoryBackend, MemoryService, dump_memory, reinforce_weight, restore_memory
from ruvllm_lab.memory.vectors import clustered_unit_vectors

from .conftest import ROOT
from .pg_fixture import drop_schema, new_schema, pg_memory_config

DIM = 16
BACKENDS = ["sqlite", "postgres"]


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def basis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


@pytest.fixture(params=BACKENDS)
def make_config(request, tmp_path):
    """config(**overrides) -> MemoryConfig of a fresh store of the parametrised backend."""
    made = []

    def make(**kw) -> MemoryConfig:
        kw.setdefault("similar_edges_k", 0)
        kw.setdefault("writeback_interval_ms", 20)
        if request.param == "sqlite":
            return MemoryConfig(db_path=str(tmp_path / f"memory{len(made)}.db"), **kw)
        dsn = request.getfixturevalue("pg_dsn")
        schema = new_schema()
        made.append((dsn, schema))
        return pg_memory_config(dsn, schema, **kw)

    yield make
    for dsn, schema in made:
        drop_schema(dsn, schema)


@pytest.fixture
def mem(make_config):
    m = MemoryService(make_config(), DIM)
    yield m
    m.close()


def test_the_backend_satisfies_the_protocol(mem):
    assert isinstance(mem.backend, MemoryBackend)
    assert mem.ping() >= 0.0
    assert mem.stats()["backend"] == mem.config.backend


def test_add_and_search(mem):
    vecs = clustered_unit_vectors(300, DIM, clusters=10, seed=1)
    ids = [mem.add(f"node {i}", kind="document" if i % 2 else "interaction", vector=v, metadata={"i": i})
           for i, v in enumerate(vecs)]
    assert mem.count() == 300 and mem.count("document") == 150
    for j in (0, 7, 123, 299):
        hits = mem.search(vecs[j], k=5)
        assert hits[0].node_id == ids[j] and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].text == f"node {j}" and hits[0].metadata == {"i": j}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    only_docs = mem.search(vecs[0], k=10, kinds=("document",))
    assert len(only_docs) == 10 and all(h.kind == "document" for h in only_docs)
    assert mem.search(vecs[0], k=0) == []


def test_a_rare_kind_is_found_however_far_from_the_query(mem):
    vecs = clustered_unit_vectors(200, DIM, clusters=4, seed=2)
    for i, v in enumerate(vecs):
        mem.add(f"n{i}", vector=v)
    far = -vecs[0]  # the opposite direction: never among an ANN search's candidates for vecs[0]
    cid = mem.add("the correction", kind="correction", vector=far)
    hits = mem.search(vecs[0], k=2, kinds=("correction",))
    assert [h.node_id for h in hits] == [cid] and hits[0].score == pytest.approx(-1.0, abs=1e-4)


def test_similar_edges_on_add_and_expand(make_config):
    with MemoryService(make_config(similar_edges_k=2, similar_edge_min_score=0.5), DIM) as m:
        a = m.add("a", vector=basis(0))
        b = m.add("b", vector=basis(0) + 0.1 * basis(1))
        c = m.add("c", vector=-basis(0))  # dissimilar: no similar edge
        edges = {(e.src, e.dst): e for e in m.edges()}
        assert (b, a) in edges and edges[(b, a)].type == "similar"
        assert edges[(b, a)].weight == pytest.approx(float(m.vector(a) @ m.vector(b)), abs=1e-5)
        assert all(c not in (e.src, e.dst) for e in edges.values())
        d = m.add("d", vector=basis(5), edges=[(c, "followed_by", 0.7)])  # orthogonal to all: no similar edge
        sg = m.expand([a], hops=1)
        assert sg.node_ids == [a, b] and sg.edge_index.tolist() == [[1], [0]]
        sg = m.expand([d], hops=2, seed_scores={d: 0.9})
        assert sg.node_ids == [d, c] and sg.hops.tolist() == [0, 1]
        assert sg.seed_scores.tolist() == pytest.approx([0.9, 0.0])
        assert m.expand([12345]).node_ids == []


def test_reinforce_follows_the_rule_and_prunes(make_config):
    with MemoryService(make_config(edge_learning_rate=0.5, edge_prune_below=0.05), DIM) as m:
        a, b, c = (m.add(t, vector=unit(i)) for i, t in enumerate("abc"))
        m.add_edge(a, b, "similar", 0.6)
        m.add_edge(b, c, "followed_by", 0.06)
        m.add_edge(a, c, "similar", 0.3)
        q0 = {i: m.get(i).quality for i in (a, b, c)}
        assert m.reinforce([a, b], 1.0) == 1  # only a->b has both ends in the set
        w = {(e.src, e.dst): e.weight for e in m.edges()}
        assert w[(a, b)] == pytest.approx(reinforce_weight(0.6, 1.0, 0.5))
        assert w[(a, c)] == pytest.approx(0.3) and w[(b, c)] == pytest.approx(0.06)
        assert m.get(a).quality == pytest.approx(reinforce_weight(q0[a], 1.0, 0.5))
        assert m.get(c).quality == pytest.approx(q0[c])
        assert m.reinforce([b, c], -1.0) == 0  # 0.06 -> 0.03 < 0.05: pruned
        assert (b, c) not in {(e.src, e.dst) for e in m.edges()}
        ab = next(e for e in m.edges() if (e.src, e.dst) == (a, b))
        assert ab.use_count == 1
        with pytest.raises(ValueError):
            m.reinforce([a, b], 1.5)


def test_decay_by_elapsed_days_then_prune(make_config):
    with MemoryService(make_config(edge_decay_per_day=0.1, edge_prune_below=0.3), DIM) as m:
        a, b, c = (m.add(t, vector=unit(i)) for i, t in enumerate("abc"))
        m.add_edge(a, b, "similar", 0.8)
        m.add_edge(b, c, "similar", 0.35)
        now = max(e.updated_at for e in m.edges()) + 2 * 86_400.0
        assert m.decay(now=now) == 1  # 0.35 * 0.81 < 0.3
        (e,) = m.edges()
        assert (e.src, e.dst) == (a, b) and e.weight == pytest.approx(0.8 * 0.9 ** 2, rel=1e-4)
        assert m.decay(now=now) == 0  # nothing elapsed since the last decay
        assert m.edges()[0].weight == pytest.approx(0.8 * 0.9 ** 2, rel=1e-4)


def test_capacity_evicts_the_lowest_value_nodes(make_config):
    with MemoryService(make_config(max_nodes=20), DIM) as m:
        low = [m.add(f"low {i}", vector=unit(i), quality=0.0) for i in range(5)]
        high = [m.add(f"high {i}", vector=unit(100 + i), quality=1.0) for i in range(15)]
        m.add_edge(low[0], high[0], "similar", 0.5)
        m.add("one more", vector=unit(999), quality=1.0)  # 21 > 20: the lowest value (oldest tie) goes
        assert m.count(include_archived=True) <= 20
        survivors = {n.id for n in m.nodes(include_archived=True)}
        assert set(high) <= survivors and low[0] not in survivors
        assert all(low[0] not in (e.src, e.dst) for e in m.edges())  # edges went with the node
        assert all(h.node_id != low[0] for h in m.search(unit(0), k=20))
        assert m.evict(2) and m.count() == len(survivors) - 2


def test_archive_hides_from_search_and_expansion_but_keeps_the_node(mem):
    a = mem.add("a", vector=unit(1))
    b = mem.add("b", vector=unit(2))
    mem.add_edge(a, b, "similar", 0.9)
    mem.archive([b])
    assert [h.node_id for h in mem.search(unit(2), k=5)] == [a]
    assert mem.expand([a]).node_ids == [a]
    assert mem.get(b).archived and mem.get(b).text == "b"
    assert mem.count() == 1 and mem.count(include_archived=True) == 2
    assert mem.stats()["archived"] == 1


def test_update_metadata_merges_and_search_carries_it(mem):
    nid = mem.add("an answer", vector=unit(3), metadata={"request_id": "r1", "trust": "unverified"})
    merged = mem.update_metadata(nid, {"trust": "verified", "verified_by": ["judge"]})
    assert merged == {"request_id": "r1", "trust": "verified", "verified_by": ["judge"]}
    assert mem.get(nid).metadata == merged
    assert mem.search(unit(3), k=1)[0].metadata == merged
    with pytest.raises(KeyError):
        mem.update_metadata(nid + 1000, {"x": 1})
    with pytest.raises(ValueError):
        mem.update_metadata(nid, {"x": object()})
    assert mem.get(nid).metadata == merged  # a refused patch changes nothing


def test_mark_used_counts_uses(mem):
    a, b = mem.add("a", vector=unit(1)), mem.add("b", vector=unit(2))
    mem.add_edge(a, b, "similar", 0.5)
    mem.mark_used([a, b, a])
    assert mem.get(a).use_count == 1 and mem.get(a).last_used_at is not None
    assert mem.edges()[0].use_count == 1


def test_reopen_with_another_dimension_is_refused(make_config):
    cfg = make_config()
    with MemoryService(cfg, DIM) as m:
        m.add("x", vector=unit(1))
    with pytest.raises(DimensionMismatch):
        MemoryService(cfg, DIM * 2)
    with MemoryService(cfg, DIM) as m:
        assert m.count() == 1


CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from ruvllm_lab.config import MemoryConfig
    from ruvllm_lab.memory import MemoryService
    cfg = MemoryConfig(**json.loads(sys.argv[1]))
    m = MemoryService(cfg, {dim})
    rng = np.random.default_rng(0)
    for i in range(40):
        v = rng.standard_normal({dim}).astype(np.float32)
        nid = m.add(f"acked {{i}}", vector=v)
        print(nid, flush=True)  # acknowledged: add() returned
    os._exit(9)  # a crash: no close(), no index save
""")


def test_acknowledged_writes_survive_a_crash(make_config, tmp_path):
    cfg = make_config()
    with MemoryService(cfg, DIM) as m:  # a store with a saved index to reconcile against
        before = m.add("before the crash", vector=unit(1))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(dim=DIM), json.dumps(asdict(cfg))],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 9, proc.stderr
    acked = [int(x) for x in proc.stdout.split()]
    assert len(acked) == 40
    with MemoryService(cfg, DIM) as m:
        assert m.count() == 41
        rng = np.random.default_rng(0)
        for nid in acked:
            v = rng.standard_normal(DIM).astype(np.float32)
            assert m.search(v, k=1)[0].node_id == nid  # in the index, not only in the table
        assert m.get(before).text == "before the crash"


def test_dump_and_restore_round_trip(make_config, tmp_path):
    src_cfg, dst_cfg = make_config(), make_config()
    with MemoryService(src_cfg, DIM) as m:
        ids = [m.add(f"n{i}", vector=unit(i), metadata={"i": i}) for i in range(30)]
        m.add_edge(ids[0], ids[1], "similar", 0.4)
        m.archive([ids[2]])
    out = dump_memory(src_cfg, DIM, tmp_path / "dump")
    assert out["memory"]["nodes"] == 30 and out["memory"]["edges"] == 1
    with MemoryService(dst_cfg, DIM) as m:
        m.add("to be replaced", vector=unit(77))
    assert restore_memory(dst_cfg, DIM, tmp_path / "dump", out["components"])
    with MemoryService(dst_cfg, DIM) as m:
        assert m.count(include_archived=True) == 30 and m.count() == 29
        assert m.search(unit(5), k=1)[0].node_id == ids[5] and m.get(ids[5]).metadata == {"i": 5}
        assert [(e.src, e.dst, e.weight) for e in m.edges()] == [(ids[0], ids[1], pytest.approx(0.4))]
        assert m.add("after", vector=unit(99)) > max(ids)  # ids are never reused
    if src_cfg.backend == "postgres":  # (for SQLite, backup.restore checks the manifest's dimension)
        with pytest.raises(DimensionMismatch):
            restore_memory(dst_cfg, DIM * 2, tmp_path / "dump", out["components"])


def test_the_writeback_queue_reaches_the_backend(mem):
    for i in range(50):
        mem.enqueue(f"queued {i}", vector=unit(i))
    mem.flush()
    assert mem.count() == 50 and mem.search(unit(7), k=1)[0].text == "queued 7"
