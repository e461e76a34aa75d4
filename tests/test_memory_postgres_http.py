"""Two real ``ruvllm serve`` processes (edge profile) on one PostgreSQL memory, over real HTTP.

A correction given through one replica is recalled by a paraphrase asked of the other: the
memory is shared, not copied.  PostgreSQL + pgvector come from the pgserver wheel (``pg_dsn``).
"""
from __future__ import annotations

import pytest

from .test_server import Server

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_a_correction_given_to_one_replica_is_recalled_by_the_other(pg_dsn, pg_schema, tmp_path_factory):
    shared = ["memory.backend=postgres", f"memory.dsn={pg_dsn}", f"memory.pg_schema={pg_schema}",
              "server.rate_limit_per_minute=0", "system.max_concurrent_requests=1"]
    a = Server(tmp_path_factory.mktemp("replica-a"), shared)
    try:
        b = Server(tmp_path_factory.mktemp("replica-b"), shared)
    except BaseException:
        a.stop()
        raise
    try:
        with a.client() as ca, b.client() as cb:
            ca.timeout = cb.timeout = 300  # model-backed calls on a shared 2-core machine
            first = ca.post("/v1/query", json={"query": "What is the capital of Australia?"})
            assert first.status_code == 200, first.text
            fb = ca.post("/v1/feedback", json={"request_id": first.json()["request_id"], "rating": 1,
                                               "correction": "The capital of Australia is Canberra."})
            assert fb.status_code == 200, fb.text
            correction_node = fb.json()["correction_node"]
            assert correction_node > 0
            para = cb.post("/v1/query", json={"query": "Which city is Australia's capital city?"})
            assert para.status_code == 200, para.text
            sources = para.json()["sources"]
            assert any(s["node_id"] == correction_node and s["kind"] == "correction" for s in sources), sources
            assert "Canberra" in next(s["text"] for s in sources if s["node_id"] == correction_node)
            for c in (ca, cb):  # both replicas report the same shared store
                health = c.get("/v1/health")
                assert health.status_code == 200, health.text
    finally:
        stopped = [b.stop(), a.stop()]  # both, even if the first fails
        assert all(stopped)
