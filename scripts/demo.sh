#!/usr/bin/env bash
# The demo: installs what is missing, then replays the bundled real Bazel streams (two
# Bazel versions, both file formats) through EVT -> a private RabbitMQ -> DSI workers
# (SQLite) and shows what was stored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
echo "== building buildbus"
cargo build --quiet --locked
echo "== buildbus demo"
exec target/debug/buildbus demo "$@"
