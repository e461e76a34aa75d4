"""Operations files: alert rules and dashboard query only exported metrics, the scripts and the
systemd unit hold together, and the examples work against a real server / a real model."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ruvllm_lab.config import Config
from ruvllm_lab.memory import MemoryService
from ruvllm_lab.telemetry import Metrics

from .conftest import ROOT
from .test_server import KEY, free_port

# PromQL functions, aggregations and keywords the files use; any other identifier must be a metric.
PROMQL_WORDS = {"sum", "avg", "rate", "histogram_quantile", "or", "vector"}
# The seed's §4.3 alerts: name -> (severity, for)
SEED_ALERTS = {"HighLatency": ("warning", "5m"), "LowQualityScore": ("warning", "10m"),
               "MemoryPressure": ("critical", "5m"), "RouterLowConfidence": ("warning", "15m"),
               "HighErrorRate": ("critical", "5m")}


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> label names, as telemetry.Metrics' registry exposes them once every labelled
    metric has a child (labelled histograms/counters export no samples before their first use)."""
    m = Metrics(limit_bytes=2**30)
    m.observe_request("smollm2-135m", {"embed": 1.0, "generate": 40.0, "total": 50.0}, router_confidence=0.7,
                      quality=0.9)
    m.errors.labels(stage="pipeline").inc()
    names: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def metrics_in(expr: str) -> set[str]:
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)  # Grafana variable query
    bare = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"', " ", expr)  # matchers, ranges, strings
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)  # grouping labels
    return set(re.findall(r"\b[a-zA-Z_:][\w:]*", bare)) - PROMQL_WORDS


def check_expr(expr: str, exported: dict[str, set[str]]) -> None:
    names = metrics_in(expr)
    assert names, f"no metric in {expr!r}"
    missing = names - exported.keys()
    assert not missing, f"{expr!r} queries {sorted(missing)}, not exported; exported: {sorted(exported)}"
    for name, matchers in re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            assert label in exported[name] | {"instance", "job"}, f"{name} has no label {label!r} ({expr!r})"


# ---- alert rules ------------------------------------------------------------------------------------
def test_alert_rules_are_the_seeds_over_exported_metrics(exported):
    doc = yaml.safe_load((ROOT / "configs/alerts.yml").read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert {r["alert"]: (r["labels"]["severity"], r["for"]) for r in rules} == SEED_ALERTS
    for rule in rules:
        assert rule["annotations"]["summary"]
        check_expr(rule["expr"], exported)


def test_metric_check_catches_a_wrong_name(exported):
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("rate(ruvllm_errors[5m])", exported)  # the family name, not the exported ..._total
    with pytest.raises(AssertionError, match="no label"):
        check_expr('ruvllm_requests_total{model="x"}', exported)


# ---- Grafana dashboard --------------------------------------------------------------------------------
def test_grafana_dashboard_queries_exported_metrics(exported):
    dash = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    exprs = [variables["instance"]["definition"]]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    for expr in exprs:
        check_expr(expr, exported)
    used = set().union(*map(metrics_in, exprs))
    assert used >= {"ruvllm_request_latency_seconds_bucket", "ruvllm_requests_total", "ruvllm_quality_score",
                    "ruvllm_router_confidence", "ruvllm_errors_total", "ruvllm_memory_usage_bytes",
                    "ruvllm_memory_limit_bytes"}
    joined = "\n".join(exprs)
    assert "histogram_quantile(0.5," in joined and "histogram_quantile(0.99," in joined and "by (le, stage)" in joined


# ---- scripts ------------------------------------------------------------------------------------------
SCRIPTS = [ROOT / "scripts/start.sh", ROOT / "scripts/backup.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_start_stops_at_an_invalid_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nhidden_dim = -1\n")
    r = subprocess.run([str(ROOT / "scripts/start.sh")], env={**os.environ, "CONFIG": str(bad)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "hidden_dim" in r.stderr, r.stdout + r.stderr
    assert "Initializing" not in r.stdout


def test_backup_keeps_the_newest_complete_backups(tmp_path):
    root = tmp_path / "backups"
    for name in ("20200101T000000Z", "20200102T000000Z", "20200103T000000Z"):
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text("{}")
    (root / "20200104T000000Z").mkdir()  # incomplete: no manifest, not counted, left alone
    (root / "keep-me").mkdir()  # not made by the script
    overrides = ["--set", f"memory.db_path={tmp_path / 'memory.db'}", "--set", f"system.data_dir={tmp_path / 'state'}"]
    subprocess.run([sys.executable, "-m", "ruvllm_lab", "init", "--config", str(ROOT / "configs/edge.toml"),
                    *overrides], check=True, capture_output=True)
    env = {**os.environ, "CONFIG": "configs/edge.toml", "BACKUP_ROOT": str(root), "BACKUP_KEEP": "2"}
    r = subprocess.run([str(ROOT / "scripts/backup.sh"), *overrides], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    kept = {d.name for d in root.iterdir()}
    new = kept - {"20200103T000000Z", "20200104T000000Z", "keep-me"}
    assert len(new) == 1 and len(kept) == 4, kept  # the two oldest complete backups are gone
    assert json.loads((root / new.pop() / "manifest.json").read_text())["components"]["memory_db"] == "memory.db"


# ---- systemd unit -------------------------------------------------------------------------------------
def test_systemd_unit():
    text = (ROOT / "deploy/ruvllm.service").read_text()
    section, unit = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            unit.setdefault((section, key), []).append(value)
    service = {k: v[-1] for (s, k), v in unit.items() if s == "Service"}
    assert service["Restart"] == "on-failure" and int(service["RestartSec"]) > 0
    assert service["ExecStart"].endswith("/scripts/start.sh")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 30  # uvicorn's graceful shutdown takes up to 30 s, then state is saved
    assert service["NoNewPrivileges"] == "yes" and service["EnvironmentFile"] and service["WorkingDirectory"]
    assert unit[("Install", "WantedBy")] == ["multi-user.target"]
    if shutil.which("systemd-analyze"):
        local = Path(os.environ.get("TMPDIR", "/tmp")) / f"ruvllm-verify-{os.getpid()}.service"
        local.write_text(text.replace("/opt/ruvllm", str(ROOT)))
        try:
            r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
        finally:
            local.unlink()
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr


# ---- the examples, for real -----------------------------------------------------------------------------
def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status
    except OSError:
        return 0


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The server as the runbook starts it: scripts/start.sh (validate, init, models --check, exec serve)."""
    tmp = tmp_path_factory.mktemp("ops")
    port = free_port()
    overrides = [f"memory.db_path={tmp / 'memory.db'}", f"system.data_dir={tmp / 'state'}",
                 "inference.max_tokens=16", "learning.training_interval_ms=600000"]
    env = {**os.environ, "CONFIG": "configs/edge.toml", "HOST": "127.0.0.1", "PORT": str(port),
           "RUVLLM_API_KEYS": KEY}
    log_path = tmp / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(ROOT / "scripts/start.sh"), *[a for o in overrides for a in ("--set", o)]],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while _get(f"{url}/v1/health") != 200:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        proc.wait()
        log.close()
        raise
    yield url, log_path
    proc.send_signal(signal.SIGTERM)  # start.sh exec'd the server: this is what systemd's stop does
    rc = proc.wait(timeout=90)
    log.close()
    assert rc in (0, -signal.SIGTERM) and '"event": "shutdown"' in log_path.read_text()


def run_client(url: str, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RUVLLM_API_KEY"}
    if key:
        env["RUVLLM_API_KEY"] = key
    return subprocess.run([sys.executable, str(ROOT / "examples/http_client.py"), "--url", url, *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.model
@pytest.mark.slow
def test_start_script_initialised_the_store(started):
    _, log_path = started
    log = log_path.read_text()
    assert "configs/edge.toml: ok" in log and "Initializing memory store" in log and "memory store created" in log


@pytest.mark.model
@pytest.mark.slow
def test_http_client_query_and_feedback(started):
    url, _ = started
    r = run_client(url, "--rate", "4", "--correct", "Paris is the capital of France.",
                   "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("health: healthy")
    answer = next(line for line in lines if line.startswith("answer: "))
    assert answer[len("answer: "):].strip()
    assert re.search(r"request_id=req-\w+ tier=smollm2-135m", r.stdout)
    assert re.search(r"feedback recorded: score=0\.0 correction_node=\d+", r.stdout)  # a correction scores 0


@pytest.mark.model
@pytest.mark.slow
def test_http_client_streams(started):
    url, _ = started
    r = run_client(url, "--stream", "--rate", "5", "Count to three.")
    assert r.returncode == 0, r.stderr
    answer = next(line for line in r.stdout.splitlines() if line.startswith("answer: "))
    assert answer[len("answer: "):].strip()
    assert "feedback recorded: score=1.0" in r.stdout


@pytest.mark.model
@pytest.mark.slow
def test_http_client_reports_a_missing_key(started):
    url, _ = started
    r = run_client(url, "hello", key=None)
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "API key" in r.stderr
    assert r.stdout.startswith("health: ")  # health stays open for probes


@pytest.mark.model
@pytest.mark.slow
def test_chat_session_with_rating_and_correction(tmp_path):
    overrides = [f"memory.db_path={tmp_path / 'memory.db'}", f"system.data_dir={tmp_path / 'state'}",
                 "inference.max_tokens=16"]
    script = ("What is the capital of France?\n/rate 5\n/rate 9\n/correct The capital of France is Paris.\n"
              "/quit\n")
    r = subprocess.run([sys.executable, str(ROOT / "examples/chat.py"),
                        *[a for o in overrides for a in ("--set", o)]],
                       input=script, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"bot> \S", out) and "tier=smollm2-135m" in out
    assert "rated 5/5 (quality score 1.00)" in out
    assert "usage: /rate N (1-5)" in out  # /rate 9 is refused, the chat goes on
    assert re.search(r"correction stored \(memory node \d+\)", out)
    cfg = Config.load(ROOT / "configs/edge.toml", overrides=overrides)
    mem = MemoryService(cfg.memory, dimension=cfg.embedding.dimension)
    try:
        assert [n.text for n in mem.nodes("correction")] == ["The capital of France is Paris."]
    finally:
        mem.close()
