"""Durable learning records: answered requests and their labels, in a small SQLite file.

``RequestLog(path)`` (``system.data_dir/requests.db``) holds, per answered request, what feedback
needs (tenant, question, answer, tier, interaction node, context nodes) and what the router needs
to learn from it again (its ``RouterInput`` and ``RoutingDecision``).  Every label -- the judge's
score at answer time, a user's rating later -- is a row in ``labels`` written *before* the answer
or the feedback is acknowledged, so a restart (graceful or ``kill -9``) loses none of them.

With ``memory.answer_writeback = "queued"`` the answer's interaction node is written by the memory's
writeback queue after the response; until it is, the answer row carries ``interaction_id`` -1 and a
row in ``pending_notes`` holds the node to write (committed with the answer, so a crash loses
neither).  The node's id replaces the -1 when the write commits (``note_written``); at start-up the
rows still pending are written (``RuvLLM._write_pending_notes``).  The node and ``note_written`` are
two commits in two files: a crash between them writes the node a second time at start-up (at least
once, never zero times).

A label is *learned* once a learning cycle that drained it swapped in a trained router and saved
the learned state; until then it is replayed into the learning service at start-up.  The
watermark is read before a cycle drains its queue, so a label is never marked learned before it
was trained on; one recorded during that window may be trained on twice (at least once, never
zero times).

WAL with ``synchronous=NORMAL``: a committed row survives a killed process (not a power cut).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REQUEST_LOG_FILE = "requests.db"
PENDING_NODE = -1  # AnsweredRecord.interaction_id of an answer whose memory node is not written yet

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answered (
    request_id TEXT PRIMARY KEY,
    tenant TEXT,
    session_id TEXT,
    query TEXT NOT NULL,
    answer TEXT NOT NULL,
    tier TEXT NOT NULL,
    interaction_id INTEGER NOT NULL,
    context_ids TEXT NOT NULL,
    router_input TEXT NOT NULL,
    query_vec BLOB NOT NULL,
    decision TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    score REAL NOT NULL,
    source TEXT NOT NULL,
    learned INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_unlearned ON labels (learned, seq);
CREATE TABLE IF NOT EXISTS pending_notes (
    request_id TEXT PRIMARY KEY,
    note TEXT NOT NULL
);
"""


@dataclass
class AnsweredRecord:
    request_id: str
    tenant: str | None
    session_id: str | None
    query: str
    answer: str
    tier: str
    interaction_id: int  # PENDING_NODE while the answer's node waits in the writeback queue
    context_ids: list[int]
    router_input: dict[str, Any]  # RouterInput fields except query_vec
    query_vec: np.ndarray
    decision: dict[str, Any] | None  # RoutingDecision.to_dict()


class RequestLog:
    """Answered requests (the last `keep` of them) and every label, in SQLite."""

    def __init__(self, path: str | Path, keep: int, cache_kb: int | None = None):
        """`keep`: answered requests kept (``system.feedback_window``); `cache_kb`: the connection's page
        cache (``system.request_log_cache_kb``), None = SQLite's default (2 MiB)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        if cache_kb is not None:  # appended to, read back by key: the OS page cache holds the file anyway
            self._conn.execute(f"PRAGMA cache_size=-{int(cache_kb)}")
        self._conn.executescript(_SCHEMA)
        self._writes = 0

    # ---- writing -------------------------------------------------------------------------------
    def add_answered(self, rec: AnsweredRecord, label: tuple[str, float] | None = None,
                     pending_note: dict[str, Any] | None = None) -> None:
        """Store one answered request (and the judge's label, when it gave one; and the memory node
        still to write, when the answer's node is queued) in one transaction."""
        vec = np.asarray(rec.query_vec, dtype=np.float32)
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO answered VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.request_id, rec.tenant, rec.session_id, rec.query, rec.answer, rec.tier,
                     int(rec.interaction_id), json.dumps([int(i) for i in rec.context_ids]),
                     json.dumps(rec.router_input, default=_plain), vec.tobytes(),
                     json.dumps(rec.decision, default=_plain), time.time()))
                if label is not None:
                    self._insert_label(rec.request_id, label[0], label[1], "judge")
                if pending_note is not None:
                    self._conn.execute("INSERT OR REPLACE INTO pending_notes VALUES (?,?)",
                                       (rec.request_id, json.dumps(pending_note, default=_plain)))
                self._writes += 1
                if self._writes % 100 == 0:  # keep the last `keep` answers: feedback cannot reach older ones
                    self._conn.execute("DELETE FROM answered WHERE rowid <= (SELECT MAX(rowid) FROM answered) - ?",
                                       (self.keep,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def note_written(self, request_id: str, node_id: int) -> None:
        """The answer's memory node is committed: record its id, drop the pending note."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.execute("UPDATE answered SET interaction_id = ? WHERE request_id = ?",
                                   (int(node_id), request_id))
                self._conn.execute("DELETE FROM pending_notes WHERE request_id = ?", (request_id,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def pending_notes(self) -> list[tuple[str, dict[str, Any]]]:
        """(request id, node to write) of every answer whose memory node is not written yet, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT request_id, note FROM pending_notes ORDER BY rowid").fetchall()
        return [(request_id, json.loads(note)) for request_id, note in rows]

    def add_label(self, request_id: str, tier: str, score: float, source: str) -> int:
        """Store a label; returns its sequence number."""
        with self._lock:
            return self._insert_label(request_id, tier, score, source)

    def _insert_label(self, request_id: str, tier: str, score: float, source: str) -> int:
        cur = self._conn.execute("INSERT INTO labels (request_id, tier, score, source, created) VALUES (?,?,?,?,?)",
                                 (request_id, tier, float(score), source, time.time()))
        return int(cur.lastrowid)

    def label_watermark(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM labels").fetchone()[0])

    def mark_learned(self, through_seq: int) -> None:
        with self._lock:
            self._conn.execute("UPDATE labels SET learned = 1 WHERE learned = 0 AND seq <= ?", (through_seq,))

    # ---- reading -------------------------------------------------------------------------------
    def get(self, request_id: str) -> AnsweredRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM answered WHERE request_id = ?", (request_id,)).fetchone()
        return _record(row) if row else None

    def unlearned(self) -> list[tuple[AnsweredRecord, dict[str, float]]]:
        """Each request with labels not yet learned, with its latest score per tier."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT request_id, tier, score FROM labels WHERE learned = 0 ORDER BY seq").fetchall()
        scores: dict[str, dict[str, float]] = {}
        for request_id, tier, score in rows:
            scores.setdefault(request_id, {})[tier] = float(score)
        out = []
        for request_id, tier_scores in scores.items():
            rec = self.get(request_id)
            if rec is not None:
                out.append((rec, tier_scores))
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            answered = self._conn.execute("SELECT COUNT(*) FROM answered").fetchone()[0]
            pending = self._conn.execute("SELECT COUNT(*) FROM pending_notes").fetchone()[0]
            labels, unlearned = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(learned = 0), 0) FROM labels").fetchone()
        return {"answered": int(answered), "labels": int(labels), "unlearned_labels": int(unlearned),
                "pending_notes": int(pending)}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _plain(value):
    """JSON for numpy scalars and arrays (router inputs and decisions carry them)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _record(row) -> AnsweredRecord:
    (request_id, tenant, session_id, query, answer, tier, interaction_id, context_ids, router_input, query_vec,
     decision, _created) = row
    return AnsweredRecord(request_id, tenant, session_id, query, answer, tier, int(interaction_id),
                          json.loads(context_ids), json.loads(router_input),
                          np.frombuffer(query_vec, dtype=np.float32).copy(), json.loads(decision) if decision else None)
