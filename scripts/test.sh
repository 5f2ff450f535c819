#!/usr/bin/env bash
# The whole check, as CI and people run it: formatting, lints, every Rust test (unit,
# integration against the real server, CLI), then the browser tests in headless Chromium.
# Installs what it needs (Debian's chromium, npm packages) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build"
cargo build --workspace --locked

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

step "browser tests (headless Chromium)"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
(
  cd tests/browser
  npm ci --no-audit --no-fund --loglevel=error
  PLEXUS_BIN="$PWD/../../target/debug/plexus" npm test
)

step "official SDKs (centrifuge-js, centrifuge-python) against the real binary"
PLEXUS_BIN="$PWD/target/debug/plexus" tests/sdk/run.sh
