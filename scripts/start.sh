#!/usr/bin/env bash
# RuvLLM startup, the seed's runbook (§4.1):
#   1. validate the config  2. create the memory store if it does not exist yet
#   3. check that every configured model tier is installed  4. exec the HTTP server
#
# Usage: scripts/start.sh [--set SECTION.KEY=VALUE ...]   (overrides go to every step)
# Env:   CONFIG     profile (default configs/server-cpu.toml; relative paths resolve from the repo root)
#        HOST, PORT where to listen (default 127.0.0.1:8080)
#        LOG_LEVEL  debug|info|warning|error (default: the profile's system.log_level)
#        RUVLLM_API_KEYS  comma-separated Bearer keys; when set, every route but /v1/health needs one
# Metrics are served by the same server at /v1/metrics (there is no separate metrics port).
# The server is exec'd, so SIGTERM (systemd stop) reaches it directly: it finishes in-flight
# requests, drains the memory writeback queue and saves learned state before exiting.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"  # the profiles' data paths (data/runtime/...) are relative to the repo root

CONFIG="${CONFIG:-configs/server-cpu.toml}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8080}"

if [[ -x "$ROOT/.venv/bin/ruvllm" ]]; then
    PY="$ROOT/.venv/bin/python"
    RUVLLM=("$ROOT/.venv/bin/ruvllm")
else
    PY="${PYTHON:-python3}"
    RUVLLM=("$PY" -m ruvllm_lab)
fi

overrides=("$@")
if [[ -n "${LOG_LEVEL:-}" ]]; then
    overrides+=(--set "system.log_level=$LOG_LEVEL")
fi
ruvllm() { "${RUVLLM[@]}" "$1" --config "$CONFIG" "${overrides[@]}" "${@:2}"; }

echo "Starting RuvLLM with config: $CONFIG"

# 1. Validate configuration (exit 2 listing every problem)
ruvllm validate

# 2. Initialize the memory store if needed
db_path="$("$PY" - "$CONFIG" "${overrides[@]}" <<'PYEOF'
import sys
from ruvllm_lab.config import Config
args = sys.argv[2:]
sets = [args[i + 1] for i in range(len(args) - 1) if args[i] == "--set"]
print(Config.load(sys.argv[1], overrides=sets or None).memory.db_path)
PYEOF
)"
if [[ ! -f "$db_path" ]]; then
    echo "Initializing memory store $db_path ..."
    ruvllm init
fi

# 3. Models: fail fast when a configured tier is not installed (the ladder ships as offline
#    packages, so there is nothing to download; split tiers are assembled on first load)
ruvllm models --check

# 4. Start the server
exec "${RUVLLM[@]}" serve --config "$CONFIG" "${overrides[@]}" --host "$HOST" --port "$PORT"
