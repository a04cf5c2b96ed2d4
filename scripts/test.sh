#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: installs what is missing, then
# formatting, lints, and every unit and integration test (against real components) of
# every workspace member: buildbus, crates/testkit and crates/bench.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if [ -f scripts/ensure-deps.sh ]; then
  bash scripts/ensure-deps.sh
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test --workspace"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
