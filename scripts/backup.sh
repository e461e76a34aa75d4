#!/usr/bin/env bash
# RuvLLM backup, the seed's runbook (§4.4): `ruvllm backup` into a new timestamped directory
# (memory store via SQLite's online backup, router/attention/EWC/replay state, resolved config,
# manifest.json with sha256 per file), then keep only the newest BACKUP_KEEP complete backups.
# Safe while the server runs.  Restore with: ruvllm restore --config $CONFIG DIR  (server stopped).
#
# Usage: scripts/backup.sh [--set SECTION.KEY=VALUE ...]
# Env:   CONFIG       profile (default configs/server-cpu.toml, relative to the repo root)
#        BACKUP_ROOT  where backups go (default backups/ in the repo root)
#        BACKUP_KEEP  how many complete backups to keep (default 7)
#        S3_BACKUP_BUCKET  optional: also `aws s3 sync` the new backup there
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CONFIG="${CONFIG:-configs/server-cpu.toml}"
BACKUP_ROOT="${BACKUP_ROOT:-backups}"
BACKUP_KEEP="${BACKUP_KEEP:-7}"
if ! [[ "$BACKUP_KEEP" =~ ^[1-9][0-9]*$ ]]; then
    echo "BACKUP_KEEP must be a positive integer, got '$BACKUP_KEEP'" >&2
    exit 2
fi

if [[ -x "$ROOT/.venv/bin/ruvllm" ]]; then
    RUVLLM=("$ROOT/.venv/bin/ruvllm")
else
    RUVLLM=("${PYTHON:-python3}" -m ruvllm_lab)
fi

backup_dir="$BACKUP_ROOT/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$BACKUP_ROOT"
echo "Creating backup in $backup_dir"
if ! "${RUVLLM[@]}" backup --config "$CONFIG" "$@" "$backup_dir"; then
    # a failed backup has no manifest.json; don't leave it behind for retention to count
    [[ -f "$backup_dir/manifest.json" ]] || rm -rf -- "$backup_dir"
    exit 1
fi

if [[ -n "${S3_BACKUP_BUCKET:-}" ]]; then
    aws s3 sync "$backup_dir" "s3://$S3_BACKUP_BUCKET/$(basename "$backup_dir")/"
    echo "Uploaded to s3://$S3_BACKUP_BUCKET/$(basename "$backup_dir")/"
fi

# Retention: only complete backups made by this script (timestamped name + manifest.json) count;
# names sort chronologically, so all but the last BACKUP_KEEP go.
mapfile -t complete < <(
    for d in "$BACKUP_ROOT"/[0-9]*T[0-9]*Z; do
        [[ -f "$d/manifest.json" ]] && echo "$d"
    done | sort
)
excess=$(( ${#complete[@]} - BACKUP_KEEP ))
for (( i = 0; i < excess; i++ )); do
    echo "Removing old backup ${complete[i]}"
    rm -rf -- "${complete[i]}"
done
echo "Backup complete: $backup_dir ($(( ${#complete[@]} - (excess > 0 ? excess : 0) )) kept in $BACKUP_ROOT)"
