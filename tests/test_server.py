"""The HTTP server, served for real by uvicorn in a subprocess on a free loopback port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ruvllm_lab.config import Config
from ruvllm_lab.memory import MemoryService

from .conftest import ROOT

pytestmark = [pytest.mark.model, pytest.mark.slow]

KEY, RATE_KEY = "test-key-1", "test-key-rate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ruvllm serve` as a real process; stops with SIGTERM like systemd would."""

    def __init__(self, tmp: Path, overrides: list[str], keys: str = f"{KEY},{RATE_KEY}", verify=True):
        self.port = free_port()
        tls = any(o.startswith("server.tls_certfile=") for o in overrides)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify = verify
        self.overrides = [f"memory.db_path={tmp / 'memory.db'}", f"system.data_dir={tmp / 'state'}",
                          "inference.max_tokens=16", "learning.training_interval_ms=600000", *overrides]
        self.config = Config.load(ROOT / "configs/edge.toml", overrides=self.overrides)
        args = [sys.executable, "-m", "ruvllm_lab", "serve", "--config", str(ROOT / "configs/edge.toml"),
                "--host", "127.0.0.1", "--port", str(self.port)]
        for o in self.overrides:
            args += ["--set", o]
        env = {**os.environ, "RUVLLM_API_KEYS": keys}
        self.log = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (tmp / f"server-{self.port}.log").read_text()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=30, verify=self.verify).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise TimeoutError("server did not become healthy")

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=self.verify)

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down gracefully (uvicorn re-raises the signal afterwards)."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.log.close()
        log = Path(self.log.name).read_text()
        return rc in (0, -signal.SIGTERM) and '"event": "shutdown"' in log and "Finished server process" in log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("srv"), ["server.rate_limit_per_minute=40", "server.max_body_bytes=4096",
                                                 "system.max_concurrent_requests=1"])
    yield s
    assert s.stop()


def test_query_returns_the_seed_schema(server):
    with server.client() as c:
        r = c.post("/v1/query", json={"query": "What is the capital of France?", "constraints": {"temperature": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] and 0 <= body["confidence"] <= 1 and body["request_id"]
    assert isinstance(body["sources"], list) and body["routing_info"]["tier"] == "smollm2-135m"
    assert r.headers["x-request-id"]


def test_stream_yields_chunks_and_a_final_event(server):
    events = []
    with server.client() as c, c.stream("POST", "/v1/query", json={"query": "Count to three.", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    chunks = [d["text"] for n, d in events if n == "chunk"]
    assert len(chunks) >= 2 and events[-1][0] == "done"
    assert events[-1][1]["text"] == "".join(chunks)


def test_feedback_and_sessions(server):
    with server.client() as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        q = c.post("/v1/query", json={"query": "Hello, who are you?", "session_id": sid}).json()
        assert q["session_id"] == sid
        fb = c.post("/v1/feedback", json={"request_id": q["request_id"], "rating": 4, "correction": "I am RuvLLM."})
        assert fb.status_code == 200 and fb.json()["correction_node"] > 0
        missing = c.post("/v1/feedback", json={"request_id": "req-nope", "rating": 3})
        assert missing.status_code == 404 and missing.json()["error"] == "request_not_found"


def test_401_without_or_with_a_wrong_key(server):
    with server.client(key=None) as c:
        assert c.post("/v1/query", json={"query": "hi"}).status_code == 401
        assert c.get("/v1/metrics").status_code == 401
        assert c.get("/v1/health").status_code == 200  # health stays open for probes
    with server.client(key="wrong") as c:
        r = c.post("/v1/sessions")
        assert r.status_code == 401 and "API key" in r.json()["detail"]


@pytest.mark.parametrize("body,fragment", [
    ({}, "query"),
    ({"query": ""}, "query"),
    ({"query": " \n\t"}, "query"),
    ({"query": 3}, "query"),
    ({"query": "hi", "constraints": {"temperature": 9}}, "temperature"),
    ({"query": "hi", "constraints": {"max_tokens": 100000}}, "max_tokens"),
    ({"query": "hi", "unknown": 1}, "unknown"),
    ({"query": "hi", "stream": "true"}, "stream"),  # strict: no string-to-bool coercion
    ({"query": "hi", "constraints": {"max_tokens": "8"}}, "max_tokens"),  # nor string-to-int
])
def test_422_for_malformed_bodies(server, body, fragment):
    with server.client() as c:
        r = c.post("/v1/query", json=body)
    assert r.status_code == 422 and fragment in r.text


def test_422_for_non_json_and_bad_feedback(server):
    with server.client() as c:
        assert c.post("/v1/query", content=b"not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/feedback", json={"request_id": "x", "rating": 7}).status_code == 422
        assert c.post("/v1/feedback", json={"request_id": "x", "correction": "   "}).status_code == 422
        r = c.post("/v1/feedback", json={"request_id": "x"})
        assert r.status_code == 422 and "rating" in r.json()["detail"]


def test_413_for_an_oversized_body(server):
    with server.client() as c:
        r = c.post("/v1/query", json={"query": "x" * 10_000})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


def test_429_over_the_rate_with_retry_after(server):
    codes = []
    with server.client(RATE_KEY) as c:
        for _ in range(80):
            r = c.post("/v1/sessions")
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                break
    assert codes[0] == 200 and codes[-1] == 429
    with server.client() as c:  # limits are per key
        assert c.post("/v1/sessions").status_code == 200


def test_503_when_saturated(server):
    """max_concurrent_requests=1: while a stream holds the only slot, another query is turned away."""
    with server.client() as c, c.stream("POST", "/v1/query", json={"query": "Tell me a long story about a cat.",
                                                                  "stream": True,
                                                                  "constraints": {"max_tokens": 64}}) as r:
        it = r.iter_lines()
        next(line for line in it if line.startswith("data: "))  # the stream is generating now
        with server.client() as c2:
            busy = c2.post("/v1/query", json={"query": "hi"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        for _ in it:
            pass


def test_metrics_are_prometheus_text(server):
    with server.client() as c:
        r = c.get("/v1/metrics")
    assert r.status_code == 200 and "ruvllm_request_latency_seconds_bucket" in r.text


def test_sigterm_under_load_loses_no_acknowledged_feedback(tmp_path):
    srv = Server(tmp_path, ["system.max_concurrent_requests=4", "server.rate_limit_per_minute=0"])
    with srv.client() as c:
        ids = [c.post("/v1/query", json={"query": f"Fact number {i}?", "constraints": {"max_tokens": 4}}).json()[
            "request_id"] for i in range(4)]
    acknowledged, stop = [], threading.Event()

    def send_feedback(i: int):
        with srv.client() as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/feedback", json={"request_id": ids[i % 4], "correction": f"correction {i}"})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acknowledged.append(r.json()["correction_node"])
                i += 4

    def load():
        with srv.client() as c:
            while not stop.is_set():
                try:
                    c.post("/v1/query", json={"query": "Keep busy.", "constraints": {"max_tokens": 8}})
                except httpx.TransportError:
                    return

    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(send_feedback, i) for i in range(2)] + [ex.submit(load) for _ in range(2)]
        time.sleep(3)
        assert srv.stop()
        stop.set()
        for f in futures:
            f.result()
    assert acknowledged
    mem = MemoryService(srv.config.memory, dimension=srv.config.embedding.dimension)
    try:
        stored = {n.id for n in mem.nodes("correction")}
    finally:
        mem.close()
    assert set(acknowledged) <= stored


def test_tls_when_a_certificate_is_configured(tmp_path):
    import ssl
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = Server(tmp_path, [f"server.tls_certfile={cert}", f"server.tls_keyfile={key}"],
                 verify=ssl.create_default_context(cafile=str(cert)))
    try:
        assert srv.url.startswith("https://")
        with srv.client() as c:
            assert c.get("/v1/health").status_code == 200
            r = c.post("/v1/query", json={"query": "Say hi.", "constraints": {"max_tokens": 4}})
            assert r.status_code == 200, r.text
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served on the TLS port
            httpx.get(srv.url.replace("https://", "http://") + "/v1/health", timeout=10)
    finally:
        assert srv.stop()
