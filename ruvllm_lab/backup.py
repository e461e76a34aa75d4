"""Backup and restore (the seed's runbook §4.4), as a library call behind ``ruvllm backup/restore``.

A backup directory holds::

    memory.db            SQLite store, copied with the sqlite3 online-backup API (consistent
                         even while a server has it open in WAL mode)
    memory.db.faiss      the saved faiss index (+ .json sidecar), when one exists; optional --
                         the store rebuilds/reconciles it on open
    router_weights.pt, attention_weights.pt, ewc_state.pt, replay_buffer.pt
                         the learned-state files of ``config.STATE_FILES`` that exist in
                         ``system.data_dir``
    config.toml          the resolved configuration
    manifest.json        timestamp, version, components present, sha256 and size of each file,
                         memory dimension and node count

``restore`` verifies every checksum and the memory dimension *before* touching anything,
then replaces the memory store (removing a stale ``-wal``/``-shm``) and the state files.
Learned-state files that are absent from the backup are removed, so the restored state is
exactly the backed-up one.  Stop the server before restoring.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from .config import STATE_FILES, Config
from .errors import DimensionMismatch, MemoryStoreError
from .memory.vectors import index_path_for

MANIFEST = "manifest.json"
MEMORY_DB = "memory.db"
MEMORY_INDEX = "memory.db.faiss"
CONFIG_FILE = "config.toml"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sqlite_copy(src: Path, dst: Path) -> None:
    """Consistent copy of a live SQLite database into a fresh file (journal mode DELETE at rest)."""
    if dst.exists():
        dst.unlink()
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(str(dst))
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    finally:
        target.close()
        source.close()


def _store_info(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        dim = conn.execute("SELECT value FROM meta WHERE key='dimension'").fetchone()
        nodes = conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
        edges = conn.execute("SELECT COUNT(*) FROM edges").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise MemoryStoreError(f"{db} is not a readable memory store: {e}") from e
    finally:
        conn.close()
    return {"dimension": int(dim[0]) if dim else None, "nodes": int(nodes), "edges": int(edges)}


def backup(config: Config, directory: str | os.PathLike) -> Path:
    """Copy the memory store, learned state and config into `directory`; returns it.

    Refuses a directory that already holds a backup (``manifest.json``), so nothing is overwritten.
    """
    from . import __version__

    out = Path(directory)
    if (out / MANIFEST).exists():
        raise MemoryStoreError(f"{out} already holds a backup ({MANIFEST}); choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    components: dict[str, str] = {}
    memory: dict[str, Any] = {}

    db = Path(config.memory.db_path)
    if db.exists():
        _sqlite_copy(db, out / MEMORY_DB)
        components["memory_db"] = MEMORY_DB
        memory = _store_info(out / MEMORY_DB)
        index = index_path_for(db)
        sidecar = Path(f"{index}.json")
        if index.exists() and sidecar.exists():
            shutil.copy2(index, out / MEMORY_INDEX)
            shutil.copy2(sidecar, out / f"{MEMORY_INDEX}.json")
            components["memory_index"] = MEMORY_INDEX
            components["memory_index_meta"] = f"{MEMORY_INDEX}.json"

    data_dir = Path(config.system.data_dir)
    for name, filename in STATE_FILES.items():
        src = data_dir / filename
        if src.is_file():
            shutil.copy2(src, out / filename)
            components[name] = filename

    config.save(out / CONFIG_FILE)
    components["config"] = CONFIG_FILE

    manifest = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "components": components,
        "files": {f: {"sha256": _sha256(out / f), "bytes": (out / f).stat().st_size} for f in components.values()},
        "memory": memory,
        "source": {"db_path": str(db), "data_dir": str(data_dir)},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)  # the manifest appears last: its presence means the backup is complete
    return out


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MemoryStoreError(f"{directory} is not a backup: {MANIFEST} is missing") from None
    except json.JSONDecodeError as e:
        raise MemoryStoreError(f"{path} is not valid JSON: {e}") from None


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a backup against its manifest checksum; returns the manifest."""
    src = Path(directory)
    manifest = read_manifest(src)
    for filename, info in manifest.get("files", {}).items():
        path = src / filename
        if not path.is_file():
            raise MemoryStoreError(f"backup {src} is incomplete: {filename} is missing")
        if _sha256(path) != info["sha256"]:
            raise MemoryStoreError(f"backup {src} is corrupt: {filename} does not match its sha256")
    return manifest


def restore(config: Config, directory: str | os.PathLike) -> dict[str, Any]:
    """Replace the memory store and learned state of `config` with the backup in `directory`.

    Verifies checksums and the memory dimension first (DimensionMismatch when the backup's
    store was made with another ``embedding.dimension``); returns the manifest.
    """
    src = Path(directory)
    manifest = verify(src)
    components = manifest.get("components", {})
    dim = manifest.get("memory", {}).get("dimension")
    if "memory_db" in components and dim is not None and dim != config.embedding.dimension:
        raise DimensionMismatch(f"backup {src} holds a memory store of dimension {dim}, but the configured "
                                f"embedding.dimension is {config.embedding.dimension}; nothing was restored")

    db = Path(config.memory.db_path)
    index = index_path_for(db)
    sidecar = Path(f"{index}.json")
    if "memory_db" in components:
        db.parent.mkdir(parents=True, exist_ok=True)
        staged = db.with_name(db.name + ".restoring")
        _sqlite_copy(src / components["memory_db"], staged)
        for stale in (Path(f"{db}-wal"), Path(f"{db}-shm"), index, sidecar):
            stale.unlink(missing_ok=True)  # a WAL from the old store must never be replayed onto the new one
        os.replace(staged, db)
        if "memory_index" in components:
            shutil.copy2(src / components["memory_index"], index)
            shutil.copy2(src / components["memory_index_meta"], sidecar)

    data_dir = Path(config.system.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, filename in STATE_FILES.items():
        target = data_dir / filename
        if name in components:
            tmp = target.with_name(target.name + ".restoring")
            shutil.copy2(src / components[name], tmp)
            os.replace(tmp, target)
        else:
            target.unlink(missing_ok=True)
    return manifest
