"""Shared fixtures. Tests use real parts: real models, real faiss, real SQLite, real HTTP."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from ruvllm_lab.config import Config

from .pg_fixture import pg_dsn, pg_schema  # noqa: F401  (a real PostgreSQL + pgvector)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def edge_config(tmp_path) -> Config:
    """The edge profile with its memory store and learned state under a temp dir."""
    return Config.load(ROOT / "configs" / "edge.toml", overrides={
        "memory.db_path": str(tmp_path / "memory.db"),
        "system.data_dir": str(tmp_path / "state"),
    })
