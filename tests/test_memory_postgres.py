"""What only the PostgreSQL + pgvector backend promises: several processes share one memory.

Runs on a real PostgreSQL 16 + pgvector (``pg_dsn`` from tests/pg_fixture.py, started from the
pgserver wheel).  The contract every backend keeps is tests/test_memory_contract.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict

import numpy as np
import psycopg
import pytest

from ruvllm_lab import backup as backup_mod
from ruvllm_lab.config import Config, MemoryConfig
from ruvllm_lab.errors import MemoryStoreError
from ruvllm_lab.memory import MemoryService, reinforce_weight
from ruvllm_lab.memory.postgres import HNSW_INDEX

from .conftest import ROOT
from .pg_fixture import pg_memory_config

DIM = 16


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_two_services_on_one_database_see_each_others_writes(pg_dsn, pg_schema):
    cfg = pg_memory_config(pg_dsn, pg_schema, similar_edges_k=0)
    with MemoryService(cfg, DIM) as a, MemoryService(cfg, DIM) as b:
        nid = a.add("written through a", vector=unit(1), kind="correction")
        assert b.search(unit(1), k=1)[0].node_id == nid  # no cache, no reload: the next statement sees it
        assert b.search(unit(1), k=1, kinds=("correction",))[0].text == "written through a"
        b.update_metadata(nid, {"verified": True})
        assert a.get(nid).metadata == {"verified": True}
        b.archive([nid])
        assert a.search(unit(1), k=1) == []


REINFORCER = textwrap.dedent("""
    import json, sys
    from ruvllm_lab.config import MemoryConfig
    from ruvllm_lab.memory import MemoryService
    cfg = MemoryConfig(**json.loads(sys.argv[1]))
    ids = json.loads(sys.argv[2])
    with MemoryService(cfg, {dim}) as m:
        for _ in range({n}):
            m.reinforce(ids, 1.0)
""")


def test_edge_learning_from_concurrent_processes_loses_no_update(pg_dsn, pg_schema):
    """Two processes reinforce the same edge at once; the weight must be the rule applied 2n times
    (with a read-modify-write in Python instead of one UPDATE, concurrent updates would be lost)."""
    lr, n, w0 = 0.05, 40, 0.5
    cfg = pg_memory_config(pg_dsn, pg_schema, similar_edges_k=0, edge_learning_rate=lr)
    with MemoryService(cfg, DIM) as m:
        a, b = m.add("a", vector=unit(1)), m.add("b", vector=unit(2))
        m.add_edge(a, b, "similar", w0)
        q0 = m.get(a).quality
    script = REINFORCER.format(dim=DIM, n=n)
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(asdict(cfg)), json.dumps([a, b])],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    expected_w, expected_q = w0, q0
    for _ in range(2 * n):
        expected_w, expected_q = reinforce_weight(expected_w, 1.0, lr), reinforce_weight(expected_q, 1.0, lr)
    with MemoryService(cfg, DIM) as m:
        (e,) = m.edges()
        assert e.weight == pytest.approx(expected_w, rel=1e-9) and e.use_count == 2 * n
        assert m.get(a).quality == pytest.approx(expected_q, rel=1e-9)


def test_hnsw_settings_come_from_config_and_a_change_rebuilds_the_index(pg_dsn, pg_schema):
    cfg = pg_memory_config(pg_dsn, pg_schema, hnsw_m=8, hnsw_ef_construction=40, hnsw_ef_search=4)
    with MemoryService(cfg, DIM) as m:
        assert m.open_report == {"index": "created"}
        for i in range(300):
            m.add(f"n{i}", vector=unit(i))
        assert len(m.search(unit(3), k=50)) == 50  # k above ef_search: ef_search is raised to k
        assert m.search(unit(3), k=1)[0].text == "n3"
    with psycopg.connect(pg_dsn) as conn:
        (opts,) = conn.execute("SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                               "WHERE n.nspname = %s AND c.relname = %s", (pg_schema, HNSW_INDEX)).fetchone()
        assert sorted(opts) == ["ef_construction=40", "m=8"]
    with MemoryService(cfg, DIM) as m:
        assert m.open_report == {"index": "loaded"}
    cfg16 = pg_memory_config(pg_dsn, pg_schema, hnsw_m=16, hnsw_ef_construction=64)
    with MemoryService(cfg16, DIM) as m:
        assert m.open_report == {"index": "rebuilt"} and m.search(unit(7), k=1)[0].text == "n7"


def test_the_dsn_comes_from_the_environment_or_a_clear_error(pg_dsn, pg_schema, monkeypatch):
    monkeypatch.delenv("RUVLLM_MEMORY_DSN", raising=False)
    with pytest.raises(MemoryStoreError, match="RUVLLM_MEMORY_DSN"):
        MemoryService(MemoryConfig(backend="postgres", pg_schema=pg_schema), DIM)
    monkeypatch.setenv("RUVLLM_MEMORY_DSN", pg_dsn)
    with MemoryService(MemoryConfig(backend="postgres", pg_schema=pg_schema), DIM) as m:
        assert m.add("x", vector=unit(1)) > 0 and m.stats()["nodes"] == 1
    with pytest.raises(MemoryStoreError, match="cannot connect"):
        MemoryService(MemoryConfig(backend="postgres", dsn="postgresql://nobody@127.0.0.1:1/none",
                                   pg_schema=pg_schema), DIM)


def test_a_dropped_connection_is_reopened(pg_dsn, pg_schema):
    with MemoryService(pg_memory_config(pg_dsn, pg_schema), DIM) as m:
        nid = m.add("x", vector=unit(1))
        pid = m.backend.conn.info.backend_pid
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        assert m.ping() >= 0.0  # the health check finds it broken and reconnects
        assert m.backend.conn.info.backend_pid != pid and m.get(nid).text == "x"


def test_backup_and_restore_of_a_postgres_memory(pg_dsn, pg_schema, tmp_path):
    cfg = Config.load(ROOT / "configs" / "edge.toml", overrides={
        "memory.backend": "postgres", "memory.dsn": pg_dsn, "memory.pg_schema": pg_schema,
        "memory.similar_edges_k": 0, "embedding.dimension": DIM, "system.data_dir": str(tmp_path / "state")})
    with MemoryService(cfg.memory, DIM) as m:
        ids = [m.add(f"n{i}", vector=unit(i)) for i in range(20)]
        m.add_edge(ids[0], ids[1], "corrects", 1.0)
    out = backup_mod.backup(cfg, tmp_path / "bk")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"memory_pg_nodes", "memory_pg_edges", "memory_pg_meta"} <= set(manifest["components"])
    assert manifest["memory"]["nodes"] == 20 and manifest["memory"]["edges"] == 1
    with MemoryService(cfg.memory, DIM) as m:
        m.add("written after the backup", vector=unit(50))
    backup_mod.restore(cfg, out)
    with MemoryService(cfg.memory, DIM) as m:
        assert m.count() == 20 and {n.id for n in m.nodes()} == set(ids)
        assert [(e.src, e.dst, e.type) for e in m.edges()] == [(ids[0], ids[1], "corrects")]
    sqlite_cfg = cfg.with_overrides({"memory.backend": "sqlite", "memory.db_path": str(tmp_path / "m.db")})
    with pytest.raises(MemoryStoreError, match="holds a postgres memory"):
        backup_mod.restore(sqlite_cfg, out)
    assert not (tmp_path / "m.db").exists()  # refused before anything was touched
