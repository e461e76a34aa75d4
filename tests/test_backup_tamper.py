"""Issue 14 item 3: restore trusts nothing in a backup directory.

Each case tampers with a real backup (real SQLite store, real state files, real request log) and
checks that restore refuses it with a message naming the problem, that the live store and state
are left exactly as they were, and that nothing outside the backup and target directories is read
or written (a sentinel outside both keeps its bytes, and no staging or `.restoring` file is left).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ruvllm_lab.backup import backup, restore, verify
from ruvllm_lab.cli import main as cli_main
from ruvllm_lab.config import STATE_FILES, Config
from ruvllm_lab.errors import MemoryStoreError
from ruvllm_lab.memory import MemoryService
from ruvllm_lab.records import REQUEST_LOG_FILE, AnsweredRecord, RequestLog

DIM = 16


def unit(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def system(edge_config, tmp_path):
    """A populated store, learned-state files and a request log; returns (config, outside sentinel)."""
    cfg = edge_config.with_overrides({"embedding.dimension": DIM})
    with MemoryService(cfg.memory, DIM) as m:
        for i in range(10):
            m.add(f"n{i}", vector=unit(i))
    data = Path(cfg.system.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / STATE_FILES["router_weights"]).write_bytes(b"router-v1" * 10)
    log = RequestLog(data / REQUEST_LOG_FILE, keep=10)
    log.add_answered(AnsweredRecord("req-1", "alice", None, "q", "a", "smollm2-135m", 1, [], {}, unit(1), None),
                     label=("smollm2-135m", 0.9))
    log.close()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "other.db").write_bytes(b"not yours")
    return cfg, outside


def state_of(cfg: Config, outside: Path) -> dict:
    """Bytes of every file under the store's and data dir's folders, and outside."""
    roots = {Path(cfg.memory.db_path).parent, Path(cfg.system.data_dir), outside}
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def rewrite_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def refused(cfg, out, outside, match: str) -> None:
    before = state_of(cfg, outside)
    with pytest.raises(MemoryStoreError, match=match):
        restore(cfg, out)
    assert state_of(cfg, outside) == before  # nothing replaced, nothing left behind, nothing outside touched


def test_a_round_trip_restores_the_request_log_too(system, tmp_path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")
    assert "request_log" in json.loads((out / "manifest.json").read_text())["components"]
    (Path(cfg.system.data_dir) / REQUEST_LOG_FILE).unlink()
    restore(cfg, out)
    log = RequestLog(Path(cfg.system.data_dir) / REQUEST_LOG_FILE, keep=10)
    try:
        assert log.get("req-1").tenant == "alice" and log.counts()["labels"] == 1
    finally:
        log.close()
    assert not list(Path(cfg.system.data_dir).glob(".restore-staging-*"))


def test_a_file_without_its_checksum_is_refused(system, tmp_path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")
    (out / "memory.db").write_bytes(b"corrupt")
    rewrite_manifest(out, lambda m: m["files"].pop("memory.db"))
    refused(cfg, out, outside, "'memory_db' .*has no sha256")


def test_an_empty_file_list_is_refused(system, tmp_path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")
    (out / STATE_FILES["router_weights"]).write_bytes(b"altered")
    rewrite_manifest(out, lambda m: m.update(files={}))
    refused(cfg, out, outside, "has no sha256")


@pytest.mark.parametrize("component,path", [
    ("memory_db", "../outside/other.db"),
    ("memory_index", "/etc/hostname"),
    ("router_weights", "sub/router_weights.pt"),
])
def test_a_component_that_points_elsewhere_is_refused(system, tmp_path, component, path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")

    def point(m):
        m["components"][component] = path
        if component == "memory_index":
            m["components"]["memory_index_meta"] = "memory.db.faiss.json"
        m["files"][path] = {"sha256": "0" * 64, "bytes": 1}
    rewrite_manifest(out, point)
    refused(cfg, out, outside, f"component '{component}' must be the file")


def test_an_unknown_component_is_refused(system, tmp_path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")
    (out / "payload.so").write_bytes(b"\x7fELF")
    rewrite_manifest(out, lambda m: (m["components"].update(plugin="payload.so"),
                                     m["files"].update({"payload.so": {"sha256": "0" * 64, "bytes": 4}})))
    refused(cfg, out, outside, "unknown component 'plugin'")


def test_a_symlinked_component_is_refused_and_its_target_never_read(system, tmp_path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")
    target = outside / "other.db"
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    (out / "memory.db").unlink()
    os.symlink(target, out / "memory.db")
    rewrite_manifest(out, lambda m: m["files"]["memory.db"].update(sha256=digest))  # even with a matching sum
    refused(cfg, out, outside, "memory.db is a symbolic link")


def test_a_changed_file_is_refused(system, tmp_path):
    cfg, outside = system
    out = backup(cfg, tmp_path / "bk")
    (out / STATE_FILES["router_weights"]).write_bytes(b"tampered")
    refused(cfg, out, outside, "router_weights.pt does not match its sha256")


def test_signed_backups(system, tmp_path, monkeypatch):
    cfg, outside = system
    monkeypatch.setenv(cfg.system.backup_key_env, "s3cret")
    out = backup(cfg, tmp_path / "bk")
    assert (out / "manifest.sig").exists()
    verify(out, cfg)
    # a consistent rewrite (checksums recomputed) still fails the signature
    (out / STATE_FILES["router_weights"]).write_bytes(b"evil")
    rewrite_manifest(out, lambda m: m["files"][STATE_FILES["router_weights"]].update(
        sha256=hashlib.sha256(b"evil").hexdigest(), bytes=4))
    refused(cfg, out, outside, "does not match its signature")
    unsigned = backup(cfg, tmp_path / "bk2")
    (unsigned / "manifest.sig").unlink()  # stripping the signature does not help either
    refused(cfg, unsigned, outside, "not signed")
    signed = backup(cfg, tmp_path / "bk3")
    monkeypatch.setenv(cfg.system.backup_key_env, "another key")
    refused(cfg, signed, outside, "does not match its signature")
    monkeypatch.delenv(cfg.system.backup_key_env)
    refused(cfg, signed, outside, "signed but no key")
    monkeypatch.setenv(cfg.system.backup_key_env, "s3cret")
    restore(cfg, signed)  # the right key: restored


def test_the_cli_refuses_a_traversal_backup_with_a_clear_message(system, tmp_path, capsys):
    cfg, outside = system
    config_file = cfg.save(tmp_path / "profile.toml")
    out = backup(cfg, tmp_path / "bk")
    rewrite_manifest(out, lambda m: (m["components"].update(memory_db="../outside/other.db"),
                                     m["files"].update({"../outside/other.db": {"sha256": "0" * 64, "bytes": 9}})))
    before = state_of(cfg, outside)
    assert cli_main(["restore", str(out), "--config", str(config_file)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert state_of(cfg, outside) == before
