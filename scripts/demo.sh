#!/usr/bin/env bash
# The demo: installs what is missing, then replays the bundled real Bazel streams (two
# Bazel versions, both file formats, and recorded live BES sessions through the BES
# backend) and BitBake event logs through EVT -> a private RabbitMQ -> DSI workers
# (SQLite), with a filtered monitor, and shows what was stored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
echo "== building buildbus"
cargo build --quiet --locked
echo "== buildbus demo"
exec target/debug/buildbus demo "$@"
