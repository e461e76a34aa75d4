"""A real PostgreSQL 16 + pgvector for the tests, started from the ``pgserver`` wheel (no system packages).

``pg_dsn`` (session scope) starts one server in a temp dir and yields its DSN (a Unix socket in
that dir); the server is stopped and deleted at the end of the session.  Set
``RUVLLM_TEST_PG_DSN`` to run against your own server instead (it needs pgvector and the right
to create schemas).  As root, pgserver creates a system user ``pgserver`` to run postgres as
(PostgreSQL refuses to run as root) and widens the parent directories' permissions so that
user can reach the data dir and the binaries.

``pg_memory_config(schema=None)`` gives a ``MemoryConfig`` on a fresh schema of that database.
"""
from __future__ import annotations

import os
import uuid

import pytest

from ruvllm_lab.config import MemoryConfig


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory):
    own = os.environ.get("RUVLLM_TEST_PG_DSN")
    if own:
        yield own
        return
    import pgserver  # dev dependency

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def new_schema() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def pg_schema(pg_dsn):
    """A fresh schema name in the test database, dropped afterwards."""
    schema = new_schema()
    yield schema
    drop_schema(pg_dsn, schema)


def pg_memory_config(dsn: str, schema: str, **kw) -> MemoryConfig:
    return MemoryConfig(backend="postgres", dsn=dsn, pg_schema=schema, **kw)
