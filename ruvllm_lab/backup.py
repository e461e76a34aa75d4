"""Backup and restore (the seed's runbook §4.4), as a library call behind ``ruvllm backup/restore``.

A backup directory holds a fixed set of components, each under a fixed plain file name::

    memory.db, memory.db.faiss(.json)   the SQLite memory (online-backup copy) and its faiss index, or
    memory.pg.*                          a PostgreSQL memory's dump (memory.backend = "postgres")
    router_weights.pt, attention_weights.pt, ewc_state.pt, replay_buffer.pt
                                         the learned-state files of ``config.STATE_FILES`` that exist
    requests.db                          answered requests and labels (records.py), when present
    config.toml                          the resolved configuration
    manifest.json                        timestamp, version, components, sha256 and size of every file,
                                         memory dimension and counts
    manifest.sig                         HMAC-SHA256 of manifest.json, when the key env var
                                         (``system.backup_key_env``, default RUVLLM_BACKUP_KEY) is set

Restore trusts nothing in the backup directory:

* only the known component names are accepted, each with its own fixed file name (a manifest that
  names another file, a path, or an unknown component is refused);
* every component must have a checksum, and every file must be a regular file directly in the
  backup directory (no symlink, no hard link), so nothing outside it is ever read;
* with the key set, the manifest must carry a valid signature; a signed manifest without the key is
  refused too (it cannot be verified);
* the files are copied into a staging directory inside the target data directory and hashed *as
  copied*; the memory dimension is read from the staged store itself; only when everything checks
  out are the targets replaced, and the staging directory is removed whatever happens.

Learned-state files absent from the backup are removed, so the restored state is exactly the
backed-up one.  Stop the server before restoring.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

from .config import STATE_FILES, Config
from .errors import DimensionMismatch, MemoryStoreError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CONFIG_FILE = "config.toml"
REQUEST_LOG = "requests.db"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB; refuse to read anything huge


def _memory_files() -> dict[str, str]:
    from .memory.backend import SQLITE_DUMP_DB, SQLITE_DUMP_INDEX
    files = {"memory_db": SQLITE_DUMP_DB, "memory_index": SQLITE_DUMP_INDEX,
             "memory_index_meta": f"{SQLITE_DUMP_INDEX}.json"}
    try:
        from .memory.postgres import DUMP_FILES
        files.update(DUMP_FILES)
    except ImportError:  # psycopg not installed: no PostgreSQL dumps here
        pass
    return files


def component_files() -> dict[str, str]:
    """Every component a backup may hold -> its fixed file name in the backup directory."""
    return {**_memory_files(), **STATE_FILES, "request_log": REQUEST_LOG, "config": CONFIG_FILE}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _backup_key(config: Config | None) -> bytes | None:
    env = config.system.backup_key_env if config is not None else "RUVLLM_BACKUP_KEY"
    key = os.environ.get(env, "")
    return key.encode() if key else None


def _sign(key: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def backup(config: Config, directory: str | os.PathLike) -> Path:
    """Copy the memory, learned state, request log and config into `directory`; returns it.

    Refuses a directory that already holds a backup (``manifest.json``), so nothing is overwritten.
    """
    from . import __version__
    from .memory.backend import dump_memory, sqlite_copy

    out = Path(directory)
    if (out / MANIFEST).exists():
        raise MemoryStoreError(f"{out} already holds a backup ({MANIFEST}); choose a new directory")
    out.mkdir(parents=True, exist_ok=True)

    dumped = dump_memory(config.memory, config.embedding.dimension, out)
    components: dict[str, str] = dict(dumped["components"])
    memory_info = dict(dumped["memory"])
    memory_backend = memory_info.pop("backend", None)

    data_dir = Path(config.system.data_dir)
    for name, filename in STATE_FILES.items():
        src = data_dir / filename
        if src.is_file():
            shutil.copy2(src, out / filename)
            components[name] = filename
    if (data_dir / REQUEST_LOG).is_file():
        sqlite_copy(data_dir / REQUEST_LOG, out / REQUEST_LOG)
        components["request_log"] = REQUEST_LOG

    config.save(out / CONFIG_FILE)
    components["config"] = CONFIG_FILE

    manifest = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "components": components,
        "files": {f: {"sha256": _sha256(out / f), "bytes": (out / f).stat().st_size} for f in components.values()},
        "memory": memory_info,
        "memory_backend": memory_backend,
        "source": {"memory": config.memory.db_path if config.memory.backend == "sqlite" else config.memory.backend,
                   "data_dir": str(data_dir)},
    }
    body = json.dumps(manifest, indent=2).encode()
    key = _backup_key(config)
    if key is not None:
        (out / SIGNATURE).write_text(_sign(key, body) + "\n")
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_bytes(body)
    tmp.replace(out / MANIFEST)  # the manifest appears last: its presence means the backup is complete
    return out


# ---- verification -----------------------------------------------------------------------------------
def _plain_file(directory: Path, filename: str) -> Path:
    """`directory/filename` when it is a regular file directly inside `directory`; refuse anything else."""
    if not filename or "/" in filename or "\\" in filename or filename in (".", "..") or "\x00" in filename:
        raise MemoryStoreError(f"backup {directory} is refused: {filename!r} is not a plain file name")
    path = directory / filename
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MemoryStoreError(f"backup {directory} is incomplete: {filename} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise MemoryStoreError(f"backup {directory} is refused: {filename} is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise MemoryStoreError(f"backup {directory} is refused: {filename} is not a regular file")
    if st.st_nlink > 1:
        raise MemoryStoreError(f"backup {directory} is refused: {filename} is a hard link to another file")
    return path


def read_manifest(directory: str | os.PathLike, config: Config | None = None) -> dict[str, Any]:
    """The manifest, after its signature check (see the module docstring)."""
    src = Path(directory)
    if not (src / MANIFEST).exists() and not (src / MANIFEST).is_symlink():
        raise MemoryStoreError(f"{directory} is not a backup: {MANIFEST} is missing")
    path = _plain_file(src, MANIFEST)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MemoryStoreError(f"backup {src} is refused: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    body = path.read_bytes()
    key = _backup_key(config)
    signed = (src / SIGNATURE).exists() or (src / SIGNATURE).is_symlink()
    if key is not None:
        if not signed:
            raise MemoryStoreError(f"backup {src} is refused: it is not signed ({SIGNATURE} is missing) and a backup "
                                   f"key is configured")
        given = _plain_file(src, SIGNATURE).read_text(errors="replace").strip()
        if not hmac.compare_digest(given, _sign(key, body)):
            raise MemoryStoreError(f"backup {src} is refused: {MANIFEST} does not match its signature "
                                   f"(tampered, or signed with another key)")
    elif signed:
        env = config.system.backup_key_env if config is not None else "RUVLLM_BACKUP_KEY"
        raise MemoryStoreError(f"backup {src} is signed but no key is configured to verify it; set {env}")
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemoryStoreError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise MemoryStoreError(f"backup {src} is refused: {MANIFEST} is not a JSON object")
    _check_manifest(src, manifest)
    return manifest


def _check_manifest(src: Path, manifest: dict[str, Any]) -> None:
    """Components are known names with their fixed file names, and each has exactly one checksum."""
    components, files = manifest.get("components"), manifest.get("files")
    if not isinstance(components, dict) or not isinstance(files, dict):
        raise MemoryStoreError(f"backup {src} is refused: its manifest lacks 'components' or 'files'")
    known = component_files()
    for name, filename in components.items():
        if name not in known:
            raise MemoryStoreError(f"backup {src} is refused: unknown component {name!r} "
                                   f"(known: {', '.join(sorted(known))})")
        if filename != known[name]:
            raise MemoryStoreError(f"backup {src} is refused: component {name!r} must be the file {known[name]!r}, "
                                   f"the manifest names {filename!r}")
        info = files.get(filename)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64:
            raise MemoryStoreError(f"backup {src} is refused: component {name!r} ({filename}) has no sha256 checksum")
    extra = set(files) - set(components.values())
    if extra:
        raise MemoryStoreError(f"backup {src} is refused: checksums for files that are no component: "
                               f"{', '.join(sorted(map(str, extra)))}")
    if "memory_index" in components and "memory_index_meta" not in components:
        raise MemoryStoreError(f"backup {src} is refused: memory_index without memory_index_meta")


def verify(directory: str | os.PathLike, config: Config | None = None) -> dict[str, Any]:
    """Check the manifest (and signature) and every component against its checksum; returns the manifest."""
    src = Path(directory)
    manifest = read_manifest(src, config)
    for filename, info in manifest["files"].items():
        if _sha256(_plain_file(src, filename)) != info["sha256"]:
            raise MemoryStoreError(f"backup {src} is corrupt: {filename} does not match its sha256")
    return manifest


# ---- restore -------------------------------------------------------------------------------------------
def restore(config: Config, directory: str | os.PathLike) -> dict[str, Any]:
    """Replace the memory, learned state and request log of `config` with the backup in `directory`.

    Everything is verified on a staged copy first (see the module docstring); DimensionMismatch when the
    backup's store was made with another ``embedding.dimension``.  Returns the manifest.
    """
    from .memory.backend import dump_backend, restore_memory, sqlite_store_info

    src = Path(directory)
    manifest = read_manifest(src, config)
    components: dict[str, str] = manifest["components"]
    data_dir = Path(config.system.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".restore-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for filename, info in manifest["files"].items():  # copy, hashing what was copied
            _copy_checked(src, filename, staging / filename, info["sha256"])
        kind = dump_backend(components)
        if kind == "sqlite":
            dim = sqlite_store_info(staging / components["memory_db"])["dimension"]
            if dim is not None and dim != config.embedding.dimension:
                raise DimensionMismatch(f"backup {src} holds a memory store of dimension {dim}, but the configured "
                                        f"embedding.dimension is {config.embedding.dimension}; nothing was restored")
        if kind is not None and kind != config.memory.backend:
            raise MemoryStoreError(f"backup {src} holds a {kind} memory but memory.backend is "
                                   f"{config.memory.backend!r}; nothing was restored")
        if "request_log" in components:
            _check_sqlite(staging / REQUEST_LOG, src)

        # swap: everything below reads only the verified staging copy
        restore_memory(config.memory, config.embedding.dimension, staging, components)
        for name, filename in STATE_FILES.items():
            target = data_dir / filename
            if name in components:
                os.replace(staging / filename, target)
            else:
                target.unlink(missing_ok=True)
        log_target = data_dir / REQUEST_LOG
        for stale in (Path(f"{log_target}-wal"), Path(f"{log_target}-shm")):
            stale.unlink(missing_ok=True)  # a WAL of the old log must never be replayed onto the new one
        if "request_log" in components:
            os.replace(staging / REQUEST_LOG, log_target)
        else:
            log_target.unlink(missing_ok=True)
    except OSError as e:
        raise MemoryStoreError(f"restore from {src} failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _copy_checked(src_dir: Path, filename: str, dst: Path, sha256: str) -> None:
    """Copy one component (a plain file of the backup directory), refusing it if its bytes do not match."""
    path = _plain_file(src_dir, filename)
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f, open(dst, "wb") as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            out.write(block)
    if h.hexdigest() != sha256:
        raise MemoryStoreError(f"backup {src_dir} is corrupt: {filename} does not match its sha256; nothing was "
                               f"restored")


def _check_sqlite(path: Path, src: Path) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise MemoryStoreError(f"backup {src} is refused: {path.name} is not an SQLite database ({e})") from None
