"""Crash safety (SIGKILL mid-write), backup/restore round trips and the memory CLI commands."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ruvllm_lab.backup import backup, restore, verify
from ruvllm_lab.cli import main as cli_main
from ruvllm_lab.config import STATE_FILES, Config
from ruvllm_lab.errors import DimensionMismatch, MemoryStoreError
from ruvllm_lab.memory import MemoryService

ROOT = Path(__file__).resolve().parent.parent
DIM = 32

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ruvllm_lab.config import MemoryConfig
    from ruvllm_lab.memory import MemoryService
    db, progress, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def unit(i):
        v = np.random.default_rng(i).standard_normal(dim).astype(np.float32)
        return v / np.linalg.norm(v)
    cfg = MemoryConfig(db_path=db, similar_edges_k=3, similar_edge_min_score=0.0, writeback_batch_size=16,
                       writeback_interval_ms=5)
    mem = MemoryService(cfg, dim)
    i = 0
    while True:  # runs until killed
        for _ in range(40):
            mem.enqueue(f"memory {i}", vector=unit(i), metadata={"i": i})
            i += 1
        mem.flush()
        if i == 200:
            mem.save()  # an index on disk that later writes make stale
        with open(progress, "a") as f:  # only flushed writes are reported
            f.write(f"{i}\\n"); f.flush()
""")


def unit(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path):
    db, progress = tmp_path / "memory.db", tmp_path / "progress.txt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(progress), str(DIM)], env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lines = progress.read_text().split() if progress.exists() else []
            if len(lines) >= 12 or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)  # most likely in the middle of a batch
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    flushed = int(progress.read_text().split()[-1])
    assert flushed >= 400

    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    cfg = Config().memory
    cfg.db_path, cfg.similar_edges_k = str(db), 0
    with MemoryService(cfg, DIM) as m:
        assert m.open_report["index"] == "loaded" and m.open_report["added"] >= flushed - 200
        assert set(m.index.ids().tolist()) == set(m.store.active_ids().tolist())
        assert m.count() >= flushed
        by_i = {n.metadata["i"]: n.id for n in m.nodes()}
        assert set(range(flushed)) <= set(by_i)
        for i in range(0, flushed, 7):
            hit = m.search(unit(i), k=1)[0]
            assert hit.node_id == by_i[i] and hit.score == pytest.approx(1.0, abs=1e-5)
        for e in m.edges():  # no dangling edges
            m.get(e.src), m.get(e.dst)


# ---- backup / restore -----------------------------------------------------------------
@pytest.fixture
def populated(edge_config):
    cfg = edge_config.with_overrides({"embedding.dimension": DIM, "memory.similar_edges_k": 2,
                                      "memory.similar_edge_min_score": 0.0})
    with MemoryService(cfg.memory, DIM) as m:
        ids = [m.add(f"n{i}", vector=unit(i), quality=0.5) for i in range(25)]
        m.add_edge(ids[0], ids[1], "answered_by", 0.6)
        m.reinforce(ids[:3], 1.0)
        m.mark_used(ids[:5])
    data = Path(cfg.system.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / STATE_FILES["router_weights"]).write_bytes(b"router-v1" * 100)
    (data / STATE_FILES["ewc_state"]).write_bytes(b"ewc-v1" * 50)
    return cfg


def snapshot(cfg: Config) -> dict:
    with MemoryService(cfg.memory, DIM) as m:
        nodes = [(n.id, n.text, n.kind, n.metadata, n.quality, n.use_count, n.archived) for n in m.nodes(include_archived=True)]
        edges = [(e.src, e.dst, e.type, round(e.weight, 9), e.use_count) for e in m.edges()]
        vectors = {n[0]: m.vector(n[0]).tobytes() for n in nodes}
        search = [h.node_id for h in m.search(unit(3), k=5)]
    state = {name: (Path(cfg.system.data_dir) / f).read_bytes() for name, f in STATE_FILES.items()
             if (Path(cfg.system.data_dir) / f).exists()}
    return {"nodes": nodes, "edges": edges, "vectors": vectors, "search": search, "state": state}


def test_backup_restore_round_trip(populated, tmp_path):
    cfg = populated
    before = snapshot(cfg)
    out = backup(cfg, tmp_path / "bk")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"memory_db", "memory_index", "memory_index_meta", "router_weights",
                                           "ewc_state", "config"}
    assert manifest["memory"] == {"dimension": DIM, "nodes": 25, "edges": len(before["edges"])}
    assert manifest["version"] and manifest["timestamp"]
    assert Config.load(out / "config.toml").to_dict() == cfg.to_dict()

    # diverge: new memories, learning, new and changed state files
    with MemoryService(cfg.memory, DIM) as m:
        m.add("after the backup", vector=unit(3))
        m.reinforce([n[0] for n in before["nodes"][:3]], -1.0)
        m.evict(4)
    data = Path(cfg.system.data_dir)
    (data / STATE_FILES["router_weights"]).write_bytes(b"router-v2")
    (data / STATE_FILES["replay_buffer"]).write_bytes(b"replay")
    assert snapshot(cfg) != before

    restore(cfg, out)
    assert snapshot(cfg) == before
    assert not Path(cfg.memory.db_path + "-wal").exists() or Path(cfg.memory.db_path + "-wal").stat().st_size == 0


def test_backup_refuses_to_overwrite_and_restore_checks_the_backup(populated, tmp_path):
    out = backup(populated, tmp_path / "bk")
    with pytest.raises(MemoryStoreError, match="already holds a backup"):
        backup(populated, out)
    with pytest.raises(MemoryStoreError, match="manifest.json is missing"):
        restore(populated, tmp_path)
    (out / STATE_FILES["router_weights"]).write_bytes(b"tampered")
    with pytest.raises(MemoryStoreError, match="router_weights.pt does not match"):
        verify(out)
    before = snapshot(populated)
    with pytest.raises(MemoryStoreError):
        restore(populated, out)
    assert snapshot(populated) == before


def test_restore_into_another_dimension_is_refused(populated, tmp_path):
    out = backup(populated, tmp_path / "bk")
    other = populated.with_overrides({"embedding.dimension": 64, "memory.db_path": str(tmp_path / "other.db")})
    with pytest.raises(DimensionMismatch, match="dimension 32.*64"):
        restore(other, out)
    assert not Path(other.memory.db_path).exists()


def test_backup_of_an_empty_system_has_only_the_config(edge_config, tmp_path):
    out = backup(edge_config, tmp_path / "bk")
    assert json.loads((out / "manifest.json").read_text())["components"] == {"config": "config.toml"}


# ---- CLI ------------------------------------------------------------------------------
def test_cli_init_backup_restore(populated, tmp_path, capsys):
    config_file = populated.save(tmp_path / "profile.toml")
    fresh = Config.load(config_file, overrides={"memory.db_path": str(tmp_path / "fresh" / "memory.db")})
    fresh_file = fresh.save(tmp_path / "fresh.toml")
    assert cli_main(["init", "--config", str(fresh_file)]) == 0
    assert "created" in capsys.readouterr().out and Path(fresh.memory.db_path).exists()
    assert cli_main(["init", "--config", str(fresh_file)]) == 0
    assert "opened" in capsys.readouterr().out

    before = snapshot(populated)
    assert cli_main(["backup", str(tmp_path / "bk"), "--config", str(config_file)]) == 0
    assert "backup complete" in capsys.readouterr().out
    with MemoryService(populated.memory, DIM) as m:
        m.evict(10)
    assert cli_main(["restore", str(tmp_path / "bk"), "--config", str(config_file)]) == 0
    assert snapshot(populated) == before
    assert cli_main(["restore", str(tmp_path / "nowhere"), "--config", str(config_file)]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err


def test_cli_init_on_a_store_of_another_dimension_fails_cleanly(populated, tmp_path, capsys):
    wrong = populated.with_overrides({"embedding.dimension": 48})
    path = wrong.save(tmp_path / "wrong.toml")
    assert cli_main(["init", "--config", str(path)]) == 1
    assert "dimension 32" in capsys.readouterr().err
