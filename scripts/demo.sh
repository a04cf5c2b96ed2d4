#!/usr/bin/env bash
# The demo: installs what is missing, starts a private RabbitMQ node (buildbus-testkit,
# the tests' rig), then replays the bundled real Bazel streams (two Bazel versions, both
# file formats, and recorded live BES sessions through the BES backend) and BitBake event
# logs through EVT -> that node -> DSI workers (SQLite), with a filtered monitor, shows
# what was stored, and stops the node it started (also on an error or Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
echo "== building buildbus and buildbus-testkit"
cargo build --quiet --locked --workspace
bin="${CARGO_TARGET_DIR:-target}/debug"

echo "== starting a private RabbitMQ node"
# buildbus-testkit prints the node's AMQP URL as its first line, then runs the node
# until its stdin ends: stdin is a pipe whose write end only this script holds.
mkdir -p .demo
fifos=$(mktemp -d)
mkfifo "$fifos/in" "$fifos/out"
"$bin/buildbus-testkit" rabbitmq --dir .demo <"$fifos/in" >"$fifos/out" &
rig_pid=$!
exec {rig_in}>"$fifos/in" {rig_out}<"$fifos/out"
rm -rf "$fifos"

# Stops the node this script started, and only that one: end of its stdin, then wait.
stop_rig() {
    if [ -n "$rig_pid" ]; then
        exec {rig_in}>&- {rig_out}<&-
        wait "$rig_pid" || true
        rig_pid=
    fi
}
trap stop_rig EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

url=
if ! IFS= read -r url <&"$rig_out" || [ -z "$url" ]; then
    echo "demo.sh: the private RabbitMQ node did not start (see above)" >&2
    exit 1
fi

echo "== buildbus demo"
status=0
"$bin/buildbus" demo --url "$url" "$@" || status=$?
echo "== stopping the private RabbitMQ node"
stop_rig
exit "$status"
