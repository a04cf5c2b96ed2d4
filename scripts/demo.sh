#!/usr/bin/env bash
# The demo: replays the bundled real Bazel streams (two Bazel versions, both file
# formats) through the Event Translation Layer and shows a summary per build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --locked
bin=target/debug/buildbus
echo "== buildbus translate --summary (real Bazel 4.2.3 JSON and Bazel 2.1.0 binary streams)"
"$bin" translate --summary tests/fixtures/bazel/*.json tests/fixtures/bazel/bazel-2.1.0/*.bin \
  2> >(grep -v '^$' >&2)
echo "== the first three normalized messages of tests/fixtures/bazel/test_mixed.json"
"$bin" translate tests/fixtures/bazel/test_mixed.json | head -n 3
